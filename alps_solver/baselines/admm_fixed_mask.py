"""Gradual ADMM pruning (Boza 2024, arXiv 2401.02938, "Fast and Optimal Weight Update for Pruned LLMs").

In the damped, diagonally scaled variables of ``ScaledProblem`` (H the scaled damped Gram matrix Hs with
unit diagonal, W0 the scaled dense weights, W-layout (d_out, d_in)): minimise tr((W - W0) H (W - W0)^T)
subject to W = Z, Z zero off the mask, with the scaled ADMM iteration (penalty rho, scaled dual U)

    Z <- (W + U) * mask                        projection onto the mask
    U <- U + W - Z                             dual step
    W <- (W0 H + rho (Z - U)) (H + rho I)^-1   weight step (one Cholesky factorisation, reused)

For a fixed mask this converges to the least-squares weights on that mask. The mask itself is chosen
gradually by magnitude, as in the paper: at iteration t <= T (``schedule_iterations``) the pruned fraction
is s (1 - (1 - t / T)^3), s the pattern's sparsity, and the mask keeps the largest |W + U| the pattern
allows at that fraction; from iteration T on it is fixed at the pattern. The output is the last Z, which
satisfies the pattern exactly.

Patterns: the reference code hard-wires 2:4; here any N:M (each group's N largest are always kept, and
the pruned fraction grows among the others), ``unstructured``, ``per_row`` and ``input_channels`` (whole
columns by norm).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import require
from ..problem import GramCache, LayerProblem, ScaledProblem
from ..result import Callback, CheckRecord, Result, Status, clock
from ..sparsity import PatternKind, SparsityPattern
from ._common import COMPUTE_DTYPES, check_supported, finish, require_compute_dtype, require_version

__all__ = ["Config", "solve"]

# Whole groups of columns (channel_groups) have no fraction between none and n of m for the gradual schedule.
SUPPORTED = tuple(kind for kind in PatternKind if kind is not PatternKind.CHANNEL_GROUPS)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Config:
    version: int = 1
    rho: float = 1.0  # ADMM penalty, in the unit-diagonal scaled problem
    damping: float = 0.1  # ridge lambda = damping * mean(diag H)
    iterations: int = 20
    schedule_iterations: int = 15  # the mask reaches the pattern's sparsity at this iteration
    schedule_power: float = 3.0  # pruned fraction s (1 - (1 - t / T)^power): cubic, as in the paper
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        require_version(self.version)
        require(self.rho > 0, "rho", self.rho, "must be > 0")
        # ScaledProblem divides by sqrt(diag(H) + lambda): without damping a dead input would divide by 0.
        require(self.damping > 0, "damping", self.damping, "must be > 0")
        require(isinstance(self.iterations, int) and self.iterations >= 1, "iterations", self.iterations,
                "must be an integer >= 1")
        T = self.schedule_iterations
        require(isinstance(T, int) and 0 <= T <= self.iterations, "schedule_iterations", T,
                f"must be an integer in [0, iterations={self.iterations}]")
        require(self.schedule_power > 0, "schedule_power", self.schedule_power, "must be > 0")
        require_compute_dtype(self.compute_dtype)


def solve(
    problem: LayerProblem,
    pattern: SparsityPattern,
    config: Config | None = None,
    *,
    callback: Callback | None = None,
    cache: GramCache | None = None,
) -> Result:
    """Run the fixed ``iterations``; ``callback`` gets one CheckRecord per iteration.

    A record's ``rel_error`` is the error of Z in the scaled, damped problem. The method has no stopping
    rule, so the status is always MAX_ITER (it ran its whole budget).
    """
    config = config or Config()
    start = clock(problem.weight.device)
    check_supported("admm_fixed_mask", problem, pattern, SUPPORTED)
    dtype = COMPUTE_DTYPES[config.compute_dtype]
    scaled = ScaledProblem.build(problem, config.damping, dtype, cache)
    H, W0, rho = scaled.Hs, scaled.B0, config.rho
    eye = torch.eye(H.shape[0], dtype=dtype, device=H.device)
    factor = torch.linalg.cholesky(H + rho * eye)  # H has unit diagonal: H + rho I is well conditioned
    W0H = scaled.B0Hs  # (d_out, d_in), constant part of the weight step
    reference = max(float((W0H * W0).sum()), torch.finfo(torch.float64).tiny)
    k = max(pattern.kept_count(problem.d_out, problem.d_in), 1)
    setup = clock(problem.weight.device)

    W, U = W0.clone(), torch.zeros_like(W0)
    mask = torch.ones_like(W0, dtype=torch.bool)  # dense before the first iteration
    if config.schedule_iterations == 0:
        mask = pattern.select(W0.square())
    history: list[CheckRecord] = []
    for t in range(1, config.iterations + 1):
        previous = mask
        if t <= config.schedule_iterations:
            mask = _gradual_mask(pattern, (W + U).square(), t, config)
        Z = (W + U) * mask
        U = U + W - Z
        # (H + rho I) is symmetric: solve for the transposed right-hand sides, one column per output row.
        W = torch.cholesky_solve((W0H + rho * (Z - U)).T, factor).T

        E = Z - W0
        changed = int((mask != previous).sum())
        record = CheckRecord(iteration=t, rho=rho, support_change=changed, support_change_frac=changed / k,
                             rel_error=float(((E @ H) * E).sum()) / reference)
        history.append(record)
        log.debug("admm_fixed_mask it=%d change=%d err=%.5f", t, changed, record.rel_error)
        if callback is not None:
            callback(record)
    Z = (W + U) * mask
    done = clock(problem.weight.device)
    result = finish(
        "admm_fixed_mask", problem, pattern, config, scaled.unscale(Z), mask, start=start,
        status=Status.MAX_ITER, iterations=config.iterations, history=history,
        timings={"setup": setup - start, "admm": done - setup},
    )
    log.debug("admm_fixed_mask %s: error %.5f", pattern, result.rel_error)
    return result


def _gradual_mask(pattern: SparsityPattern, scores: torch.Tensor, t: int, config: Config) -> torch.Tensor:
    """Keep-mask at iteration t of the schedule: the pattern itself from t = T on."""
    T = config.schedule_iterations
    if t >= T:
        return pattern.select(scores)
    fraction = pattern.sparsity * (1.0 - (1.0 - t / T) ** config.schedule_power)
    if pattern.kind is not PatternKind.N_M:
        return SparsityPattern(pattern.kind, sparsity=fraction).select(scores)
    # N:M: every group's N largest stay; the fraction pruned so far comes from the rest, smallest first.
    # At t = T the fraction is 1 - N/M and exactly the N:M mask remains.
    protected = torch.where(pattern.select(scores), torch.inf, scores)
    return SparsityPattern.unstructured(fraction).select(protected)
