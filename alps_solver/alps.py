"""ALPS (Meng, Behdin, Wang, Mazumder, NeurIPS 2024, arXiv 2406.07831): ADMM, then a backsolve.

    minimise ||X (W_hat - W)^T||_F^2  subject to  W_hat in a sparsity pattern

1. Damp and diagonally scale H = X^T X (``ScaledProblem``).
2. ADMM with the adaptive rho schedule finds the support (``admm.run_admm``).
3. Preconditioned conjugate gradient refines the kept weights on that fixed support, all output rows at
   once (``pcg.masked_pcg``); rows whose true (undamped) error would grow keep their ADMM values, so the
   backsolve never raises the error.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch

from .admm import RhoSchedule, run_admm
from .config import COMPUTE_DTYPES, require, require_compute_dtype, require_version
from .pcg import masked_pcg
from .problem import GramCache, LayerProblem, ScaledProblem
from .result import BacksolveRecord, Callback, Result, clock
from .sparsity import SparsityPattern

__all__ = ["Config", "solve", "backsolve"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Config:
    """ALPS settings; ``Config.simple()`` is the faster, looser ``alps-simple`` preset."""

    version: int = 1
    damping: float = 0.01  # ridge lambda = damping * mean(diag H)
    max_iter: int = 300
    schedule: RhoSchedule = field(default_factory=RhoSchedule)
    backsolve: bool = True
    pcg_max_iter: int = 10
    pcg_rtol: float = 1e-4
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        require_version(self.version)
        require(self.damping >= 0, "damping", self.damping, "must be >= 0")
        require(isinstance(self.max_iter, int) and self.max_iter >= 1, "max_iter", self.max_iter,
                "must be an integer >= 1")
        require(isinstance(self.schedule, RhoSchedule), "schedule", self.schedule, "must be a RhoSchedule")
        require(isinstance(self.pcg_max_iter, int) and self.pcg_max_iter >= 0, "pcg_max_iter",
                self.pcg_max_iter, "must be an integer >= 0")
        require(self.pcg_rtol > 0, "pcg_rtol", self.pcg_rtol, "must be > 0")
        require_compute_dtype(self.compute_dtype)

    @classmethod
    def simple(cls) -> Config:
        """alps-simple: fewer iterations and a looser stop, for speed."""
        return cls(
            max_iter=60,
            schedule=RhoSchedule(rho_init=0.3, late_stop_after=15, late_stop_below=1e-3),
        )


def solve(
    problem: LayerProblem,
    pattern: SparsityPattern,
    config: Config | None = None,
    *,
    callback: Callback | None = None,
    cache: GramCache | None = None,
) -> Result:
    """``cache``: shared by the solves of layers with the same H, which then reuse its scaled form and
    eigendecomposition (``timings["eigh"]`` is about 0 for all but the first)."""
    config = config or Config()
    pattern.validate_shape(problem.d_out, problem.d_in)
    device = problem.weight.device
    start = clock(device)
    dtype = COMPUTE_DTYPES[config.compute_dtype]
    scaled = ScaledProblem.build(problem, config.damping, dtype, cache)
    setup = clock(device)
    outcome = run_admm(scaled, pattern, config.schedule, max_iter=config.max_iter, callback=callback)
    admm_done = clock(device)
    weight = scaled.unscale(outcome.B)
    record = None
    if config.backsolve:
        weight, record = backsolve(problem, scaled, outcome.mask, weight, config)
        before = record.rel_error_before
    else:
        before = problem.rel_error(weight)
    done = clock(device)
    after = record.rel_error_after if record else before
    log.debug("alps %s: %s after %d iterations, error %.5f -> %.5f", pattern, outcome.status.value,
              outcome.iterations, before, after)
    return Result(
        method="alps",
        pattern=str(pattern),
        weight=weight.to(problem.weight.dtype),
        mask=outcome.mask,
        status=outcome.status,
        rel_error=after,
        seconds=done - start,
        iterations=outcome.iterations,
        rel_error_before_backsolve=before,
        history=outcome.history,
        rho_updates=outcome.rho_updates,
        backsolve=record,
        timings={
            "setup": setup - start,
            "eigh": outcome.eigh_seconds,
            "admm": admm_done - setup - outcome.eigh_seconds,  # the iterations alone
            "backsolve": done - admm_done,
        },
        config=asdict(config),
    )


def backsolve(
    problem: LayerProblem,
    scaled: ScaledProblem,
    mask: torch.Tensor,
    weight: torch.Tensor,
    config: Config,
) -> tuple[torch.Tensor, BacksolveRecord]:
    """Least squares on the fixed support ``mask``, starting from ``weight`` (unscaled, (d_out, d_in))."""
    start = clock(weight.device)
    B_start = (weight * scaled.scale[None, :]).to(scaled.Hs.dtype)
    outcome = masked_pcg(
        scaled.Hs,
        scaled.B0Hs,  # right-hand sides, shared with the ADMM weight step
        mask,
        B_start,
        max_iter=config.pcg_max_iter,
        rtol=config.pcg_rtol,
        centre=scaled.B0,  # B0Hs = B0 Hs: the outcome carries each row's damped error
    )
    refined = scaled.unscale(outcome.solution)
    # The damped system is what PCG minimises; keep a row's refinement only if the true error drops.
    # Both from float32 residuals in the default compute dtype: exact to about 1e-7 of the row's reference
    # error, so a row error far below that reads as roughly zero (clamped: never negative).
    rows_before = (outcome.start_objective - _ridge_share(scaled, B_start * mask)).clamp_min(0.0)
    rows_after = (outcome.final_objective - _ridge_share(scaled, outcome.solution)).clamp_min(0.0)
    worse = rows_after > rows_before
    refined = torch.where(worse[:, None], weight, refined)
    record = BacksolveRecord(
        iterations=outcome.iterations,
        converged_rows=outcome.converged_rows,
        rows=mask.shape[0],
        max_rel_residual=outcome.max_rel_residual,
        rel_error_before=float(rows_before.sum()) / problem.reference_error,
        rel_error_after=float(torch.minimum(rows_before, rows_after).sum()) / problem.reference_error,
        reverted_rows=int(worse.sum()),
        seconds=clock(weight.device) - start,
    )
    return refined, record


def _ridge_share(scaled: ScaledProblem, B: torch.Tensor) -> torch.Tensor:
    """(d_out,) float64: the damping's part of each row's damped error, lambda ||(B - B0) S^-1||^2.

    With H = S Hs S - lambda I, a row's true (undamped) error is its damped error E Hs E^T (E = B - B0, which
    PCG reports) less this.
    """
    E = (B - scaled.B0) / scaled.scale[None, :]
    return E.square().sum(dim=1, dtype=torch.float64) * scaled.damping
