"""Wanda (Sun, Liu, Bair, Kolter 2023, arXiv 2306.11695): prune by weight times input norm, no update.

Score of weight W_ij: S_ij = |W_ij| * ||x_j||, with ||x_j|| = sqrt(H_jj) the norm of input channel j over
the calibration tokens (H = X^T X). S_ij^2 is the error ||X (W_hat - W)^T||^2 that removing W_ij alone
would cause if the inputs were uncorrelated (H diagonal).

Comparison groups: Wanda compares weights within each output row. ``unstructured`` therefore uses
per-row groups too, with the layer's exact kept count shared between rows as evenly as possible (the
leftover entries go to the rows whose next candidate scores highest); ``per_row`` is the same with equal
rows; ``n_m`` compares within each group of M inputs; ``input_channels`` keeps the columns with the largest
||x_j|| * ||W_:j||, i.e. the smallest error under the same diagonal approximation; ``channel_groups`` keeps the
groups with the largest sum of ||x_j||^2 ||W_:j||^2.

``wanda-ls`` (``Config.least_squares()``) keeps Wanda's choice of weights and re-solves their values by least
squares on the calibration inputs, min ||X (W_hat - W)^T||^2 on the fixed support (damped like ALPS): what the
reconstruction adds, measured apart from the choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import require
from ..problem import GramCache, LayerProblem
from ..result import Callback, Result, clock
from ..sparsity import PatternKind, SparsityPattern
from ._common import check_supported, finish, least_squares_on_support, mask_only, require_version, select_per_output

__all__ = ["Config", "scores", "select", "solve"]


@dataclass(frozen=True, kw_only=True)
class Config:
    version: int = 1
    reconstruct: bool = False  # re-solve the kept weights by least squares (wanda-ls)
    damping: float = 0.01  # of the least squares: ridge lambda = damping * mean(diag H), as ALPS's
    pcg_max_iter: int = 200  # when the rows keep different inputs; a support shared by every row is solved directly
    pcg_rtol: float = 1e-6

    def __post_init__(self) -> None:
        require_version(self.version)
        require(self.damping >= 0, "damping", self.damping, "must be >= 0")
        require(isinstance(self.pcg_max_iter, int) and self.pcg_max_iter >= 0, "pcg_max_iter", self.pcg_max_iter,
                "must be an integer >= 0")
        require(self.pcg_rtol > 0, "pcg_rtol", self.pcg_rtol, "must be > 0")

    @classmethod
    def least_squares(cls) -> Config:
        """wanda-ls: Wanda's mask, the kept weights re-solved by least squares."""
        return cls(reconstruct=True)


def scores(problem: LayerProblem) -> torch.Tensor:
    """S = |W| * ||x||, (d_out, d_in), in the Gram matrix's dtype (float32 or float64)."""
    H = problem.gram
    x_norm = H.diagonal().clamp_min(0).sqrt()  # (d_in,); a dead input (H_jj = 0) scores 0 everywhere
    return problem.weight.to(H.dtype).abs() * x_norm[None, :]


def select(problem: LayerProblem, pattern: SparsityPattern) -> torch.Tensor:
    """Wanda's keep-mask for ``pattern`` (see the module docstring for the comparison groups)."""
    S = scores(problem)
    return select_per_output(pattern, S.square() if pattern.by_column else S)


def solve(
    problem: LayerProblem,
    pattern: SparsityPattern,
    config: Config | None = None,
    *,
    callback: Callback | None = None,
    cache: GramCache | None = None,
) -> Result:
    """One pass, no callback records. The kept weights are the dense ones, or with ``reconstruct`` their least
    squares values on the mask."""
    config = config or Config()
    if not config.reconstruct:
        return mask_only("wanda", select, problem, pattern, config)
    start = clock(problem.weight.device)
    check_supported("wanda-ls", problem, pattern, tuple(PatternKind))
    mask = select(problem, pattern)
    weight, iterations = least_squares_on_support(problem, mask, damping=config.damping,
                                                  max_iter=config.pcg_max_iter, rtol=config.pcg_rtol)
    return finish("wanda-ls", problem, pattern, config, weight, mask, start=start, iterations=iterations)
