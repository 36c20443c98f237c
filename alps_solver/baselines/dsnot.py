"""DSnoT (Zhang et al. 2024, "Dynamic Sparse No Training", ICLR 2024, arXiv 2310.08915): prune-and-grow.

Starting from a Wanda (or magnitude) mask, every output row repeatedly swaps one pruned weight back in
for one kept weight, without changing any weight's value. Symbols, per output row i:

    W        dense weights (d_out, d_in)          M    keep-mask
    mu, var  mean and variance of each input channel over the calibration tokens
    C        C_ij = W_ij mu_j, weight ij's share of the mean of output i
    e_i      sum of C_ij over the pruned j: how far the pruned row's mean output falls short of the dense one
    S        Wanda's score |W_ij| ||x_j||
    H        X^T X, the exact error of row i being r_i H r_i^T with r_i = w_i * (1 - m_i)

One cycle, for every row still active:

- grow: the pruned weight that moves e_i towards 0 the most relative to its channel's variance
  (largest sign(e_i) C_ij / var_j^p): a low-variance channel's contribution is well described by its mean;
- prune: a kept weight with C_ij of the opposite sign to e_i (so e_i shrinks further), the one with the
  smallest Wanda score; for N:M, the kept weight with the smallest Wanda score in the grown weight's
  group, so every group keeps N;
- a row stops once |e_i| <= ``update_threshold`` (in output units, as in the paper), optionally once a
  swap would flip the sign of e_i (``same_sign``; the released code has this check off), when its
  candidates run out, and after ``max_cycles``.

Each weight's candidate lists are fixed at the start (the paper's sorted lists, walked from both ends), so
a weight moves at most once.

Guarantee (an addition to the paper): the mean-based criterion only proposes swaps. A swap is made only
if it lowers the row's exact error r_i H r_i^T, computed from H in O(d_in) per row through G = R H
(R = W * (1 - M)), kept up to date with two rows of H per swap. A final check against the initial mask,
row by row, makes the result never worse than its initial mask.

Patterns: ``unstructured`` swaps inside rows, so it keeps the initial mask's row counts and the layer's
exact kept count (with Wanda: per-row comparison groups, see ``wanda``); ``per_row`` and ``n_m`` as
described; ``input_channels`` has no per-weight swap and is refused. Needs ``input_mean`` and
``input_var`` on the problem (``LayerProblem.from_inputs`` records them): H alone cannot give the mean.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import require
from ..problem import GramCache, LayerProblem
from ..result import Callback, CheckRecord, Result, Status, clock
from ..sparsity import PatternKind, SparsityPattern
from . import magnitude, wanda
from ._common import COMPUTE_DTYPES, check_supported, finish, require_compute_dtype, require_version

__all__ = ["Config", "solve"]

log = logging.getLogger(__name__)

_INITIAL = {"wanda": wanda.select, "magnitude": magnitude.select}
SUPPORTED = (PatternKind.UNSTRUCTURED, PatternKind.PER_ROW, PatternKind.N_M)


@dataclass(frozen=True, kw_only=True)
class Config:
    version: int = 1
    initial: str = "wanda"  # the initial mask: "wanda" or "magnitude"
    max_cycles: int = 50
    update_threshold: float = 0.1  # a row stops once |e_i| is this small (output units)
    var_power: float = 1.0  # p in the grow criterion C_ij / var_j^p
    same_sign: bool = False  # also stop a row when a swap would flip the sign of e_i
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        require_version(self.version)
        require(self.initial in _INITIAL, "initial", self.initial, f"must be one of {sorted(_INITIAL)}")
        require(isinstance(self.max_cycles, int) and self.max_cycles >= 0, "max_cycles", self.max_cycles,
                "must be an integer >= 0")
        require(self.update_threshold >= 0, "update_threshold", self.update_threshold, "must be >= 0")
        require(self.var_power >= 0, "var_power", self.var_power, "must be >= 0")
        require_compute_dtype(self.compute_dtype)


def solve(
    problem: LayerProblem,
    pattern: SparsityPattern,
    config: Config | None = None,
    *,
    callback: Callback | None = None,
    cache: GramCache | None = None,
) -> Result:
    """Prune-and-grow from the initial mask; ``callback`` gets one CheckRecord per cycle.

    A record's ``rel_error`` is the true relative error of the current mask, ``rho`` is 0 (no penalty).
    Status CONVERGED when every row stopped before ``max_cycles``, MAX_ITER otherwise.
    """
    config = config or Config()
    start = clock(problem.weight.device)
    check_supported("dsnot", problem, pattern, SUPPORTED)
    if problem.input_mean is None or problem.input_var is None:
        raise ValueError(
            "dsnot needs the mean and variance of every input channel (input_mean, input_var) on the "
            "LayerProblem; build it with LayerProblem.from_inputs or pass them (H alone has no means)."
        )
    initial = _INITIAL[config.initial](problem, pattern)
    selected = clock(problem.weight.device)
    mask, status, cycles, history = _cycles(problem, pattern, initial, config, callback)
    cycled = clock(problem.weight.device)

    # Safety net against rounding in the compute dtype: a row worse than its initial mask goes back to it.
    worse = problem.row_errors(problem.weight * mask) > problem.row_errors(problem.weight * initial)
    mask = torch.where(worse[:, None], initial, mask)
    result = finish(
        "dsnot", problem, pattern, config, problem.weight * mask, mask, start=start, status=status,
        iterations=cycles, history=history,
        timings={"initial_mask": selected - start, "cycles": cycled - selected},
    )
    log.debug("dsnot %s: %s after %d cycles, %d rows reverted, error %.5f", pattern, status.value, cycles,
              int(worse.sum()), result.rel_error)
    return result


def _cycles(
    problem: LayerProblem,
    pattern: SparsityPattern,
    initial: torch.Tensor,
    config: Config,
    callback: Callback | None,
) -> tuple[torch.Tensor, Status, int, list[CheckRecord]]:
    dtype = COMPUTE_DTYPES[config.compute_dtype]
    W = problem.weight.to(dtype)
    H = problem.gram.to(dtype)
    mu = problem.input_mean.to(dtype)
    # A constant channel (var 0) would divide by zero; the clamp ranks it first instead, which is right:
    # its mean is its exact contribution.
    var = problem.input_var.to(dtype).clamp_min(torch.finfo(dtype).tiny)
    d_out, d_in = W.shape
    rows = torch.arange(d_out, device=W.device)
    n_m = pattern.kind is PatternKind.N_M
    k = max(int(initial.sum()), 1)

    M = initial.clone()
    C = W * mu  # (d_out, d_in)
    S = wanda.scores(problem).to(dtype)
    e = (C * ~M).sum(dim=1)  # (d_out,)
    G = (W * ~M) @ H  # (d_out, d_in): R H, the gradient of the row errors in R
    row_error = (G * W * ~M).sum(dim=1)
    reference = max(float(((W @ H) * W).sum()), torch.finfo(torch.float64).tiny)

    # Candidate lists, fixed for the whole run. Grow: pruned weights by C / var^p ascending (walked from
    # the top when e > 0, from the bottom when e < 0). Prune: kept weights, first those with C < 0 by
    # Wanda score ascending, then those with C >= 0 by Wanda score descending, so both ends hold the
    # least important weight of the needed sign.
    grow_order = _sorted(C / var.pow(config.var_power), last=M)
    grow_lo = torch.zeros(d_out, dtype=torch.long, device=W.device)
    grow_hi = (~M).sum(dim=1) - 1
    prune_order = _sorted(torch.where(C < 0, S, -S), last=~M, first=C < 0)
    prune_lo = torch.zeros_like(grow_lo)
    prune_hi = M.sum(dim=1) - 1

    def still_active() -> torch.Tensor:
        running = (e.abs() > config.update_threshold) & (grow_lo <= grow_hi)
        return running if n_m else running & (prune_lo <= prune_hi)

    active = still_active()  # a stopped row never restarts
    e_start_sign = e.sign()
    history: list[CheckRecord] = []
    cycle = 0
    while cycle < config.max_cycles and bool(active.any()):
        cycle += 1
        up = e > 0
        g = _take(grow_order, torch.where(up, grow_hi, grow_lo))
        grow_hi -= (active & up).long()
        grow_lo += (active & ~up).long()
        if n_m:
            p, found = _weakest_in_group(S, M & initial, g, pattern.m)
        else:
            down = e < 0
            p = _take(prune_order, torch.where(down, prune_hi, prune_lo))
            found = torch.ones_like(active)
            prune_hi -= (active & down).long()
            prune_lo += (active & ~down).long()
        Cg, Cp = C[rows, g], C[rows, p]
        if config.same_sign:
            active &= (e + Cp - Cg).sign() == e_start_sign

        # Exact change of r H r^T when r gains w_p at p and loses w_g at g.
        wg, wp = W[rows, g], W[rows, p]
        delta = (2 * (wp * G[rows, p] - wg * G[rows, g]) + wp.square() * H[p, p] + wg.square() * H[g, g]
                 - 2 * wp * wg * H[p, g])
        swap = active & found & (delta < 0)
        M[rows[swap], g[swap]] = True
        M[rows[swap], p[swap]] = False
        e = torch.where(swap, e + Cp - Cg, e)
        G += torch.where(swap, wp, 0)[:, None] * H[p] - torch.where(swap, wg, 0)[:, None] * H[g]
        row_error = torch.where(swap, row_error + delta, row_error)

        changed = 2 * int(swap.sum())
        record = CheckRecord(iteration=cycle, rho=0.0, support_change=changed, support_change_frac=changed / k,
                             rel_error=float(row_error.sum()) / reference)
        history.append(record)
        log.debug("dsnot cycle=%d active=%d swaps=%d err=%.5f", cycle, int(active.sum()), changed // 2,
                  record.rel_error)
        if callback is not None:
            callback(record)
        active &= still_active()
    status = Status.MAX_ITER if bool(active.any()) else Status.CONVERGED
    return M, status, cycle, history


def _sorted(key: torch.Tensor, *, last: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row column order by ``key`` ascending, with the ``first`` entries before and ``last`` after.

    Stable sorts, least significant first: key, then the group (0 first, 1 middle, 2 last).
    """
    order = torch.argsort(key, dim=1, stable=True)
    group = torch.where(last, 2, 1)
    if first is not None:
        group = torch.where(first & ~last, 0, group)
    return order.gather(1, torch.argsort(group.gather(1, order), dim=1, stable=True))


def _take(order: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """order[i, slot[i]] for every row (slots of stopped rows may be out of range: they are clamped)."""
    return order.gather(1, slot.clamp(0, order.shape[1] - 1)[:, None]).squeeze(1)


def _weakest_in_group(
    S: torch.Tensor, prunable: torch.Tensor, g: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """In the group of M holding column g[i]: the prunable column of smallest score, and whether one exists."""
    columns = (g - g % m)[:, None] + torch.arange(m, device=g.device)  # (d_out, m)
    scores = torch.where(prunable.gather(1, columns), S.gather(1, columns), torch.inf)
    best, at = scores.min(dim=1)
    return columns.gather(1, at[:, None]).squeeze(1), torch.isfinite(best)
