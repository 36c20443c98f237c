"""Magnitude pruning: keep the weights of largest absolute value, no weight update.

Comparison groups follow the pattern: the whole layer (``unstructured``), each output row (``per_row``),
each group of M inputs (``n_m``); ``input_channels`` keeps the columns of W with the largest norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..problem import GramCache, LayerProblem
from ..result import Callback, Result
from ..sparsity import SparsityPattern
from ._common import mask_only, require_version

__all__ = ["Config", "select", "solve"]


@dataclass(frozen=True, kw_only=True)
class Config:
    version: int = 1

    def __post_init__(self) -> None:
        require_version(self.version)


def select(problem: LayerProblem, pattern: SparsityPattern) -> torch.Tensor:
    """Keep-mask of the largest weights for ``pattern``."""
    W = problem.weight
    # Scores in at least float32: squares of half-precision weights underflow (and overflow) easily.
    magnitude = W.to(torch.promote_types(W.dtype, torch.float32)).abs()
    # |W| ranks single weights; W^2 summed down a column is the squared column norm.
    return pattern.select(magnitude.square() if pattern.by_column else magnitude)


def solve(
    problem: LayerProblem,
    pattern: SparsityPattern,
    config: Config | None = None,
    *,
    callback: Callback | None = None,
    cache: GramCache | None = None,
) -> Result:
    """One pass, no callback records. The kept weights are the dense ones, unchanged."""
    return mask_only("magnitude", select, problem, pattern, config or Config())
