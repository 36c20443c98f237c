"""Wanda (Sun, Liu, Bair, Kolter 2023, arXiv 2306.11695): prune by weight times input norm, no update.

Score of weight W_ij: S_ij = |W_ij| * ||x_j||, with ||x_j|| = sqrt(H_jj) the norm of input channel j over
the calibration tokens (H = X^T X). S_ij^2 is the error ||X (W_hat - W)^T||^2 that removing W_ij alone
would cause if the inputs were uncorrelated (H diagonal).

Comparison groups: Wanda compares weights within each output row. ``unstructured`` therefore uses
per-row groups too, with the layer's exact kept count shared between rows as evenly as possible (the
leftover entries go to the rows whose next candidate scores highest); ``per_row`` is the same with equal
rows; ``n_m`` compares within each group of M inputs; ``input_channels`` keeps the columns with the largest
||x_j|| * ||W_:j||, i.e. the smallest error under the same diagonal approximation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..problem import GramCache, LayerProblem
from ..result import Callback, Result
from ..sparsity import PatternKind, SparsityPattern
from ._common import mask_only, require_version, select_per_output

__all__ = ["Config", "scores", "select", "solve"]


@dataclass(frozen=True, kw_only=True)
class Config:
    version: int = 1

    def __post_init__(self) -> None:
        require_version(self.version)


def scores(problem: LayerProblem) -> torch.Tensor:
    """S = |W| * ||x||, (d_out, d_in), in the Gram matrix's dtype (float32 or float64)."""
    H = problem.gram
    x_norm = H.diagonal().clamp_min(0).sqrt()  # (d_in,); a dead input (H_jj = 0) scores 0 everywhere
    return problem.weight.to(H.dtype).abs() * x_norm[None, :]


def select(problem: LayerProblem, pattern: SparsityPattern) -> torch.Tensor:
    """Wanda's keep-mask for ``pattern`` (see the module docstring for the comparison groups)."""
    S = scores(problem)
    return select_per_output(pattern, S.square() if pattern.kind is PatternKind.INPUT_CHANNELS else S)


def solve(
    problem: LayerProblem,
    pattern: SparsityPattern,
    config: Config | None = None,
    *,
    callback: Callback | None = None,
    cache: GramCache | None = None,
) -> Result:
    """One pass, no callback records. The kept weights are the dense ones, unchanged."""
    return mask_only("wanda", select, problem, pattern, config or Config())
