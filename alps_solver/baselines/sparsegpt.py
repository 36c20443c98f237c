"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774): an approximate OBS sweep over the input columns.

Symbols: W (d_out, d_in) weights, H = X^T X (d_in, d_in), lambda the damping, H^-1 = U^T U with U the
upper Cholesky factor of the inverse, d_j = U_jj. Objective: min ||X (W_hat - W)^T||^2 over W_hat in the
pattern.

The columns are visited left to right. Column j is pruned where the mask says so; the error
(w_j - q_j) / d_j is spread over the columns not yet visited through row j of U, which is the optimal
(OBS) compensation given the columns already fixed. Updates are applied lazily: inside a block of
``block_size`` columns immediately, to the rest of W once per block, so most of the work is one matrix
product per block.

The mask is chosen adaptively, on the partially updated weights, by the OBS saliency w^2 / d^2:

- ``unstructured``: at the start of each block, the smallest saliencies over the whole block (all rows).
  The reference code prunes the same fraction of every block, which misses the layer's count by
  rounding; here the blocks share the layer's pruned count by a cumulative quota (the first c columns
  prune floor(P c / d_in) of the P entries), so the final mask keeps exactly ``kept_count``.
- ``per_row``: the same quota, per row.
- ``input_channels``: the same quota on whole columns, a column's saliency being the sum over its rows.
- ``n_m``: every M columns, the M - N smallest saliencies of each group (the reference's "N:M every M
  columns"); the block size is rounded down to a multiple of M so no group straddles two blocks.

Dead inputs (H_jj = 0, a channel that was zero on every calibration token) get H_jj = 1 and weight 0,
as in the reference: they change nothing in the objective, and the unit diagonal keeps H invertible.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import require
from ..problem import GramCache, LayerProblem
from ..result import Callback, Result, clock
from ..sparsity import PatternKind, SparsityPattern
from ._common import COMPUTE_DTYPES, check_supported, finish, require_compute_dtype, require_version, smallest

__all__ = ["Config", "solve"]

# Whole groups of columns (channel_groups) need a group-aware choice, which the block-wise column sweep lacks.
SUPPORTED = tuple(kind for kind in PatternKind if kind is not PatternKind.CHANNEL_GROUPS)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Config:
    version: int = 1
    block_size: int = 128  # columns per lazy-update block (and per adaptive mask choice)
    damping: float = 0.01  # lambda = damping * mean(diag H)
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        require_version(self.version)
        require(isinstance(self.block_size, int) and self.block_size >= 1, "block_size", self.block_size,
                "must be an integer >= 1")
        require(self.damping >= 0, "damping", self.damping, "must be >= 0")
        require_compute_dtype(self.compute_dtype)


def solve(
    problem: LayerProblem,
    pattern: SparsityPattern,
    config: Config | None = None,
    *,
    callback: Callback | None = None,
    cache: GramCache | None = None,
) -> Result:
    """One sweep, no callback records."""
    config = config or Config()
    device = problem.weight.device
    start = clock(device)
    check_supported("sparsegpt", problem, pattern, SUPPORTED)
    dtype = COMPUTE_DTYPES[config.compute_dtype]
    W = problem.weight.to(dtype).clone()  # (d_out, d_in), updated in place by the sweep
    W[:, problem.gram.diagonal().to(dtype) == 0] = 0.0  # dead inputs: their weights never act
    U = (cache or GramCache()).get(problem.gram, ("sparsegpt-inverse-cholesky", config.damping, dtype),
                                   lambda: _inverse_cholesky(problem.gram, dtype, config.damping))
    factorised = clock(device)
    pruned = _sweep(W, U, pattern, config.block_size)
    swept = clock(device)
    mask = ~pruned
    result = finish(
        "sparsegpt", problem, pattern, config, W, mask, start=start,
        timings={"factorize": factorised - start, "sweep": swept - factorised},
    )
    log.debug("sparsegpt %s: error %.5f", pattern, result.rel_error)
    return result


def _inverse_cholesky(gram: torch.Tensor, dtype: torch.dtype, damping: float) -> torch.Tensor:
    """U with H_d^-1 = U^T U (upper triangular), H_d the damped H with a unit diagonal for dead inputs."""
    H = gram.to(dtype).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    # Damping keeps H_d positive definite when there are fewer tokens than inputs or nearly collinear
    # channels, and bounds the OBS updates (which divide by entries of H^-1).
    H.diagonal().add_(damping * float(H.diagonal().mean()))
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        # A damped Gram matrix is positive definite, but float32 rounding can break the factorisation
        # when H is badly conditioned; float64 does not.
        L, info = torch.linalg.cholesky_ex(H.to(torch.float64))
    if int(info) != 0:
        raise ValueError(
            f"sparsegpt: the Gram matrix with damping={damping} is not positive definite; use damping > 0."
        )
    H_inv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(H_inv, upper=True).to(dtype)


def _sweep(W: torch.Tensor, U: torch.Tensor, pattern: SparsityPattern, block_size: int) -> torch.Tensor:
    """Prune W in place, column by column; return the pruned-entry mask (d_out, d_in)."""
    d_out, d_in = W.shape
    n_m = pattern.kind is PatternKind.N_M
    if n_m:
        block_size = max(pattern.m, block_size // pattern.m * pattern.m)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, d_in, block_size):
        i2 = min(i1 + block_size, d_in)
        W1 = W[:, i1:i2].clone()  # (d_out, count): this block, updated column by column
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()  # (count,)
        Err1 = torch.zeros_like(W1)  # scaled errors (w - q) / d, for the lazy update of later blocks
        if n_m:
            P1 = torch.zeros_like(W1, dtype=torch.bool)  # filled every M columns below
        else:
            P1 = _block_mask(W1.square() / d.square(), pattern, i1, i2, d_in)
        for i in range(i2 - i1):
            if n_m and i % pattern.m == 0:
                saliency = W1[:, i:i + pattern.m].square() / d[i:i + pattern.m].square()
                P1[:, i:i + pattern.m] = smallest(saliency, pattern.m - pattern.n)
            w = W1[:, i]
            q = w.masked_fill(P1[:, i], 0.0)
            err = (w - q) / d[i]
            # OBS: removing w's pruned entries, the remaining columns of the block absorb the error.
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q  # exact zeros where pruned (the update above gives them only up to rounding)
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # the lazy update: this block's errors, all later columns at once
        pruned[:, i1:i2] = P1
    return pruned


def _block_mask(saliency: torch.Tensor, pattern: SparsityPattern, i1: int, i2: int, d_in: int) -> torch.Tensor:
    """Entries of block [i1, i2) to prune, (d_out, count): its share of the pattern's pruned count."""
    d_out = saliency.shape[0]

    def share(total: int) -> int:
        # Columns [0, c) prune floor(total * c / d_in); consecutive blocks' shares add up to ``total``.
        return total * i2 // d_in - total * i1 // d_in

    if pattern.kind is PatternKind.UNSTRUCTURED:
        total = d_out * d_in - pattern.kept_count(d_out, d_in)
        return smallest(saliency.reshape(-1), share(total)).reshape(saliency.shape)
    if pattern.kind is PatternKind.PER_ROW:
        per_row = d_in - pattern.kept_count(1, d_in)
        return smallest(saliency, share(per_row))
    columns = d_in - pattern.kept_count(1, d_in)  # input_channels: kept_count(1, d_in) is the kept columns
    return smallest(saliency.sum(dim=0), share(columns))[None, :].expand_as(saliency)
