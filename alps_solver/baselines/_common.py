"""Pieces the baselines share: pattern support checks, per-row selection, and the Result they return."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from ..config import COMPUTE_DTYPES, require_compute_dtype, require_version
from ..pcg import masked_pcg
from ..problem import LayerProblem
from ..result import CheckRecord, Result, Status, clock
from ..sparsity import PatternKind, SparsityPattern

__all__ = [
    "COMPUTE_DTYPES",
    "check_supported",
    "finish",
    "keep_per_row",
    "least_squares_on_support",
    "mask_only",
    "require_compute_dtype",
    "require_version",
    "row_quotas",
    "select_per_output",
    "smallest",
]

log = logging.getLogger(__name__)



def check_supported(
    method: str, problem: LayerProblem, pattern: SparsityPattern, kinds: tuple[PatternKind, ...]
) -> None:
    """Raise ValueError naming the method and the pattern unless the method can produce ``pattern``."""
    if pattern.kind not in kinds:
        allowed = ", ".join(kind.value for kind in kinds)
        raise ValueError(
            f"{method} cannot produce pattern {pattern} ({pattern.kind.value}); it supports: {allowed}."
        )
    pattern.validate_shape(problem.d_out, problem.d_in)


def smallest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the ``count`` smallest entries along the last dimension (ties broken by position)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count <= 0:
        return mask
    index = torch.topk(scores, min(count, scores.shape[-1]), dim=-1, largest=False, sorted=False).indices
    return mask.scatter_(-1, index, True)


def keep_per_row(scores: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Mask keeping the ``kept[i]`` largest scores of every row i; ``kept`` is an int tensor (d_out,)."""
    d_out, d_in = scores.shape
    order = torch.argsort(scores, dim=1, descending=True, stable=True)  # (d_out, d_in)
    rank = torch.arange(d_in, device=scores.device).expand(d_out, d_in)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, rank < kept[:, None])


def row_quotas(scores: torch.Tensor, total: int) -> torch.Tensor:
    """Kept entries per row (d_out,), summing to ``total``, as even as the rows allow.

    Every row keeps ``total // d_out``; the ``total % d_out`` left over go to the rows whose next entry
    (the first one an even split would drop) has the largest score.
    """
    d_out, d_in = scores.shape
    base, extra = divmod(total, d_out)
    kept = torch.full((d_out,), base, dtype=torch.long, device=scores.device)
    if extra:
        next_best = torch.topk(scores, base + 1, dim=1).values[:, base]  # (d_out,)
        kept[torch.topk(next_best, extra).indices] += 1
    return kept


def select_per_output(pattern: SparsityPattern, scores: torch.Tensor) -> torch.Tensor:
    """Keep-mask with output rows as comparison groups, as in Wanda.

    ``unstructured`` compares weights within each output row only (Wanda's per-output selection) while
    still keeping exactly the layer's ``kept_count``: the rows share it as evenly as possible
    (``row_quotas``). Every other pattern is ``pattern.select``; for ``input_channels`` pass squared
    scores so that a column's score is its Euclidean norm squared.
    """
    if pattern.kind is not PatternKind.UNSTRUCTURED:
        return pattern.select(scores)
    d_out, d_in = scores.shape
    return keep_per_row(scores, row_quotas(scores, pattern.kept_count(d_out, d_in)))


def least_squares_on_support(problem: LayerProblem, mask: torch.Tensor, *, damping: float, max_iter: int,
                             rtol: float) -> tuple[torch.Tensor, int]:
    """The kept weights' least-squares values: min ||X (W_hat - W)^T||^2 + lambda ||W_hat - W||^2 with W_hat zero
    off ``mask``, lambda = ``damping`` * mean(diag H) (the ridge keeps the system definite when H is singular).
    Returns W_hat (d_out, d_in) and the iterations spent (0 for a direct solve).

    The normal equations of row i on its support S_i are W_hat_i[S_i] H_d[S_i, S_i] = W_i H_d[:, S_i], with
    H_d = H + lambda I. A support every row shares (whole input channels) is one Cholesky solve; per-row supports
    go to the masked PCG, batched over the rows.
    """
    H = problem.gram.to(torch.float64)
    mean_diagonal = float(H.diagonal().mean())
    lam = damping * mean_diagonal if mean_diagonal > 0 else 1.0
    H_d = H + lam * torch.eye(problem.d_in, dtype=torch.float64, device=H.device)
    W = problem.weight.to(torch.float64)
    rhs = W @ H_d  # (d_out, d_in)
    if bool((mask == mask[:1]).all()):
        kept = mask[0].nonzero().squeeze(1)
        weight = torch.zeros_like(W)
        if kept.numel():
            factor = torch.linalg.cholesky(H_d[kept][:, kept])
            weight[:, kept] = torch.cholesky_solve(rhs[:, kept].T, factor).T
        return weight, 0
    outcome = masked_pcg(H_d, rhs, mask, W * mask, max_iter=max_iter, rtol=rtol)
    return outcome.solution, outcome.iterations


def finish(
    method: str,
    problem: LayerProblem,
    pattern: SparsityPattern,
    config: Any,
    weight: torch.Tensor,
    mask: torch.Tensor,
    *,
    start: float,
    status: Status = Status.ONE_SHOT,
    iterations: int = 0,
    timings: dict[str, float] | None = None,
    history: list[CheckRecord] | None = None,
) -> Result:
    """The Result of a baseline: ``weight`` moved to the problem's dtype and device, error from the true H."""
    weight = weight.to(device=problem.weight.device, dtype=problem.weight.dtype)
    return Result(
        method=method,
        pattern=str(pattern),
        weight=weight,
        mask=mask.to(problem.weight.device),
        status=status,
        rel_error=problem.rel_error(weight),
        seconds=clock(problem.weight.device) - start,
        iterations=iterations,
        history=list(history or []),
        timings=dict(timings or {}),
        config=asdict(config),
    )


def mask_only(
    method: str,
    select: Callable[[LayerProblem, SparsityPattern], torch.Tensor],
    problem: LayerProblem,
    pattern: SparsityPattern,
    config: Any,
) -> Result:
    """Prune with the keep-mask ``select`` gives, leaving the kept weights as they are (one pass)."""
    start = clock(problem.weight.device)
    check_supported(method, problem, pattern, tuple(PatternKind))
    mask = select(problem, pattern)
    result = finish(method, problem, pattern, config, problem.weight * mask, mask, start=start)
    log.debug("%s %s: error %.5f", method, pattern, result.rel_error)
    return result
