"""ADMM with a constant penalty: the ALPS iteration without its rho schedule (the paper's ablation).

With rho fixed, a small rho (0.3 in the paper) lets the support keep changing until the iteration cap;
a large one (3) locks the support in after a few iterations, close to where it started, and ends with a
worse error than ALPS. The run stops at the first check whose support did not change.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import alps
from ..admm import RhoSchedule
from ..config import require, require_version
from ..problem import GramCache, LayerProblem
from ..result import Callback, Result
from ..sparsity import SparsityPattern

__all__ = ["Config", "solve"]


@dataclass(frozen=True, kw_only=True)
class Config:
    version: int = 1
    rho: float = 0.3
    damping: float = 0.01
    max_iter: int = 300
    update_every: int = 3
    backsolve: bool = True
    pcg_max_iter: int = 10
    pcg_rtol: float = 1e-4
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        require_version(self.version)
        require(self.rho > 0, "rho", self.rho, "must be > 0")
        self.as_alps()  # validates the remaining fields with ALPS's own checks

    def as_alps(self) -> alps.Config:
        return alps.Config(
            damping=self.damping,
            max_iter=self.max_iter,
            schedule=RhoSchedule(rho_init=self.rho, adaptive=False, update_every=self.update_every,
                                 rho_max=self.rho),
            backsolve=self.backsolve,
            pcg_max_iter=self.pcg_max_iter,
            pcg_rtol=self.pcg_rtol,
            compute_dtype=self.compute_dtype,
        )


def solve(
    problem: LayerProblem,
    pattern: SparsityPattern,
    config: Config | None = None,
    *,
    callback: Callback | None = None,
    cache: GramCache | None = None,
) -> Result:
    config = config or Config()
    result = alps.solve(problem, pattern, config.as_alps(), callback=callback, cache=cache)
    result.method = "admm_fixed_rho"
    result.config = {**result.config, "fixed_rho": config.rho}
    return result
