"""What every solver returns: the pruned weight and the full record of how it was obtained."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import torch

__all__ = ["Status", "CheckRecord", "RhoUpdate", "BacksolveRecord", "Result", "Callback", "clock"]


class Status(str, Enum):
    CONVERGED = "converged"  # the method's stopping rule was met
    MAX_ITER = "max_iter"  # the iteration cap was reached first
    ONE_SHOT = "one_shot"  # a non-iterative method (magnitude, Wanda, SparseGPT) finished its single pass


@dataclass(frozen=True)
class CheckRecord:
    """One convergence check of an iterative method (ALPS: every ``update_every`` iterations)."""

    iteration: int
    rho: float  # penalty in force after this check's update
    support_change: int  # entries whose kept/dropped state changed since the previous check
    support_change_frac: float  # support_change / k
    rel_error: float  # relative error of the sparse iterate D, in the scaled damped problem


@dataclass(frozen=True)
class RhoUpdate:
    iteration: int
    old: float
    new: float
    reason: str  # "grow-fast", "grow", "grow-slow", "shrink", "shrink-restart", "cap"


@dataclass(frozen=True)
class BacksolveRecord:
    """The fixed-support least-squares refinement (preconditioned conjugate gradient)."""

    iterations: int
    converged_rows: int
    rows: int
    max_rel_residual: float  # worst row's ||masked residual|| / ||masked right-hand side||
    rel_error_before: float
    rel_error_after: float
    reverted_rows: int  # rows whose error would have grown, kept at their starting point
    seconds: float


Callback = Callable[[CheckRecord], None]


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` is done: GPU kernels run asynchronously,
    so without the wait a phase's time would leak into the next one's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Result:
    """Pruned weight and history. ``weight`` has the dtype and device of the problem's weight."""

    method: str
    pattern: str
    weight: torch.Tensor  # (d_out, d_in)
    mask: torch.Tensor  # (d_out, d_in) bool, True = kept
    status: Status
    rel_error: float  # final ||X(W_hat - W)^T||^2 / ||X W^T||^2, undamped H
    seconds: float
    iterations: int = 0
    rel_error_before_backsolve: float | None = None
    history: list[CheckRecord] = field(default_factory=list)
    rho_updates: list[RhoUpdate] = field(default_factory=list)
    backsolve: BacksolveRecord | None = None
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.mask.sum()) / self.mask.numel()

    def summary(self) -> dict[str, Any]:
        """JSON-ready record without tensors (for reports and tracking)."""
        return {
            "method": self.method,
            "pattern": self.pattern,
            "status": self.status.value,
            "sparsity": self.sparsity,
            "rel_error": self.rel_error,
            "rel_error_before_backsolve": self.rel_error_before_backsolve,
            "iterations": self.iterations,
            "seconds": self.seconds,
            "timings": dict(self.timings),
            "history": [asdict(h) for h in self.history],
            "rho_updates": [asdict(u) for u in self.rho_updates],
            "backsolve": asdict(self.backsolve) if self.backsolve else None,
            "config": dict(self.config),
        }
