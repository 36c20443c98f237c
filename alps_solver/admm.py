"""ADMM with operator splitting and the ALPS penalty schedule (Meng et al. 2024, arXiv 2406.07831, Alg. 1).

Symbols (all in the damped, diagonally scaled variables of ``ScaledProblem``; W-layout (d_out, d_in)):

    H    scaled damped Gram matrix Hs (d_in, d_in), unit diagonal
    W0   scaled dense weights (d_out, d_in)
    B    weight iterate (the smooth block)        D    sparse copy (the constrained block)
    V    scaled dual variable                     rho  penalty
    Z    B + V / rho, the point projected         k    number of kept weights

The augmented Lagrangian of  min tr((B - W0) H (B - W0)^T)  s.t.  B = D, D in pattern  gives

    B <- (W0 H - V + rho D) (H + rho I)^-1      weight step
    D <- P(B + V / rho)                          projection step
    V <- V + rho (B - D)                         dual step

(H + rho I)^-1 = Q diag(1 / (L + rho)) Q^T from one eigendecomposition H = Q diag(L) Q^T, so a new rho
costs a product with the eigenbasis, never a new factorisation.

Every ``update_every`` iterations the support change (entries entering or leaving the kept set) decides
rho: large changes grow rho fast, small ones slowly; before the first growth, a moving support means rho
is already too large for the problem, so it shrinks and the iteration restarts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .config import require
from .problem import ScaledProblem, gram_matrix
from .result import Callback, CheckRecord, RhoUpdate, Status, clock
from .sparsity import SparsityPattern

__all__ = ["RhoSchedule", "AdmmOutcome", "run_admm"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RhoSchedule:
    """The adaptive penalty schedule of the paper's code; ``adaptive=False`` keeps rho constant."""

    rho_init: float = 0.1
    adaptive: bool = True
    update_every: int = 3  # iterations between support-change checks
    grow_fast_above: float = 0.1  # support change / k above which rho grows by grow_fast
    grow_fast: float = 1.3
    grow_above: float = 0.005  # ... above which rho grows by grow
    grow: float = 1.2
    grow_slow: float = 1.1  # any smaller non-zero change, once rho has grown
    shrink: float = 5.0  # divisor before the first growth
    rho_max: float = 1e6  # cap: beyond it the weight step barely moves B away from D
    late_stop_after: int = 30  # iteration after which a small support change stops the loop
    late_stop_below: float = 3e-4  # support change / k under which the late stop fires
    # A stable support only ends the run once B agrees with D (||B - D|| <= tol ||D||): with a small rho
    # the support can sit still merely because B moves slowly. The paper's code stops without this test;
    # 0 disables it.
    stable_stop_primal_below: float = 1e-2

    def __post_init__(self) -> None:
        require(self.rho_init > 0, "rho_init", self.rho_init, "must be > 0")
        require(self.update_every >= 1, "update_every", self.update_every, "must be an integer >= 1")
        require(self.grow_fast_above > self.grow_above >= 0, "grow_above", self.grow_above,
                "needs 0 <= grow_above < grow_fast_above")
        for name in ("grow_fast", "grow", "grow_slow", "shrink"):
            require(getattr(self, name) > 1, name, getattr(self, name), "must be a factor > 1")
        require(self.rho_max >= self.rho_init, "rho_max", self.rho_max, "must be >= rho_init")
        require(self.late_stop_after >= 0, "late_stop_after", self.late_stop_after, "must be >= 0")
        require(self.late_stop_below >= 0, "late_stop_below", self.late_stop_below, "must be >= 0")
        require(self.stable_stop_primal_below >= 0, "stable_stop_primal_below", self.stable_stop_primal_below,
                "must be >= 0")


@dataclass
class AdmmOutcome:
    B: torch.Tensor  # final weight iterate, projected onto the pattern (d_out, d_in)
    mask: torch.Tensor  # its support
    status: Status
    iterations: int
    history: list[CheckRecord] = field(default_factory=list)
    rho_updates: list[RhoUpdate] = field(default_factory=list)
    eigh_seconds: float = 0.0  # the one-time eigendecomposition, apart from the iterations (~0 when shared)


class _Inverse:
    """(H + rho I)^-1 built from the eigenbasis H = Q diag(L) Q^T, rebuilt only when rho changes."""

    def __init__(self, L: torch.Tensor, Q: torch.Tensor) -> None:
        self.L, self.Q = L, Q
        self.rho: float | None = None
        self.matrix = torch.empty(0)

    def at(self, rho: float) -> torch.Tensor:
        if rho != self.rho:
            # Q diag(1 / (L + rho)) Q^T = A A^T with A = Q diag((L + rho)^-1/2): a symmetric product, of
            # which gram_matrix computes only the upper panels (measured 21% faster at d_in = 1536).
            self.matrix = gram_matrix((self.Q * (self.L + rho).rsqrt()).T)
            self.rho = rho
        return self.matrix


def run_admm(
    scaled: ScaledProblem,
    pattern: SparsityPattern,
    schedule: RhoSchedule,
    *,
    max_iter: int,
    callback: Callback | None = None,
) -> AdmmOutcome:
    H, W0 = scaled.Hs, scaled.B0
    k = max(pattern.kept_count(*W0.shape), 1)
    start = clock(H.device)
    inverse = _Inverse(*scaled.scaled_gram.eigen)  # computed here, or earlier for another layer with this H
    eigh_seconds = clock(H.device) - start
    W0H = scaled.B0Hs  # (d_out, d_in), constant part of the weight step
    reference = max(float((W0H * W0).sum()), torch.finfo(torch.float64).tiny)

    def scaled_error(B: torch.Tensor) -> float:
        E = B - W0
        return float(((E @ H) * E).sum()) / reference

    rho = schedule.rho_init
    mask0 = pattern.select(W0.square())
    D0 = W0 * mask0
    # The iterates live in preallocated buffers updated in place, with Z also holding the weight step's
    # right-hand side and B - D: no temporaries for the iterates (measured: 2-13% less time per iteration
    # on CPU).
    B, D, V, Z = W0.clone(), D0.clone(), torch.zeros_like(W0), torch.empty_like(W0)
    previous = mask0
    grown = False
    status = Status.MAX_ITER
    history: list[CheckRecord] = []
    updates: list[RhoUpdate] = []
    iteration = 0
    for iteration in range(1, max_iter + 1):
        torch.add(W0H, D, alpha=rho, out=Z).sub_(V)  # Z holds the weight step's right-hand side
        torch.matmul(Z, inverse.at(rho), out=B)  # B = (W0 H - V + rho D) (H + rho I)^-1
        torch.add(B, V, alpha=1.0 / rho, out=Z)  # Z = B + V / rho
        support = pattern.select(Z.square())
        torch.mul(Z, support, out=D)
        V.add_(torch.sub(B, D, out=Z), alpha=rho)  # V += rho (B - D)
        if iteration % schedule.update_every:
            continue

        change = int(torch.count_nonzero(support != previous))
        frac = change / k
        old = rho
        reason = ""
        stop = False
        if schedule.adaptive:
            if frac > schedule.grow_fast_above:
                rho, reason, grown = rho * schedule.grow_fast, "grow-fast", True
            elif frac > schedule.grow_above:
                rho, reason, grown = rho * schedule.grow, "grow", True
            elif change > 0:
                if grown:
                    rho, reason = rho * schedule.grow_slow, "grow-slow"
                else:
                    # The support moves although rho is small: restart from the dense solution with a
                    # smaller penalty, so the iterates explore before the support is locked in.
                    rho, reason = rho / schedule.shrink, "shrink-restart"
                    B.copy_(W0), D.copy_(D0), V.zero_()
                    support = mask0
            elif grown and _primal_gap(B, D) <= schedule.stable_stop_primal_below:
                stop = True
            elif grown:
                rho, reason = rho * schedule.grow_slow, "grow-slow"
            else:
                rho, reason = rho / schedule.shrink, "shrink"
            if rho > schedule.rho_max:
                rho, reason = schedule.rho_max, f"{reason}+cap"
            if reason:
                updates.append(RhoUpdate(iteration=iteration, old=old, new=rho, reason=reason))
        elif change == 0:
            stop = True
        previous = support
        record = CheckRecord(
            iteration=iteration,
            rho=rho,
            support_change=change,
            support_change_frac=frac,
            rel_error=scaled_error(D),
        )
        history.append(record)
        log.debug("admm it=%d rho=%.4g change=%.5f err=%.5f", iteration, rho, frac, record.rel_error)
        if callback is not None:
            callback(record)
        late = iteration >= schedule.late_stop_after and frac < schedule.late_stop_below
        if stop or (late and _primal_gap(B, D) <= schedule.stable_stop_primal_below):
            status = Status.CONVERGED
            break

    final_mask = pattern.select(B.square())
    return AdmmOutcome(
        B=B * final_mask,
        mask=final_mask,
        status=status,
        iterations=iteration,
        history=history,
        rho_updates=updates,
        eigh_seconds=eigh_seconds,
    )


def _primal_gap(B: torch.Tensor, D: torch.Tensor) -> float:
    """Relative primal residual ||B - D|| / ||D|| of the splitting constraint B = D."""
    return float((B - D).norm() / D.norm().clamp_min(torch.finfo(D.dtype).tiny))
