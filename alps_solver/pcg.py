"""Preconditioned conjugate gradient on a fixed support, batched over all output rows.

For every output row i with kept inputs S_i, solve the restricted normal equations

    A[S_i, S_i] b_i[S_i] = r_i[S_i],   b_i = 0 off S_i,

where A (d_in, d_in) is symmetric positive definite and r (d_out, d_in) the right-hand sides. Each row
is an independent system on its own support, so all rows advance together: one (d_out, d_in) x
(d_in, d_in) product per iteration, with the support mask zeroing everything off S_i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PcgOutcome", "masked_pcg"]


@dataclass(frozen=True)
class PcgOutcome:
    solution: torch.Tensor  # (d_out, d_in), zero off the mask
    iterations: int
    converged_rows: int
    max_rel_residual: float
    # With ``centre`` c given (rhs = c A): each row's (x - c) A (x - c)^T, float64 (d_out,), at the masked
    # start and at the solution, read off the residuals rhs - x A that PCG computes anyway.
    start_objective: torch.Tensor | None = None
    final_objective: torch.Tensor | None = None


def masked_pcg(
    A: torch.Tensor,
    rhs: torch.Tensor,
    mask: torch.Tensor,
    x0: torch.Tensor,
    *,
    max_iter: int,
    rtol: float,
    centre: torch.Tensor | None = None,
) -> PcgOutcome:
    """Solve every row's system on its support, starting from ``x0`` (masked), Jacobi-preconditioned.

    A row stops (its step sizes are frozen at zero) once ||masked residual|| <= rtol * ||masked rhs||;
    the loop ends when every row has stopped or after ``max_iter`` iterations. ``centre`` (d_out, d_in), the
    unconstrained solution with rhs = centre A, makes the outcome carry every row's objective.
    """
    M = mask.to(A.dtype)  # (d_out, d_in)
    # Jacobi preconditioner: the inverse diagonal of A, per input. After ALPS's diagonal scaling this is
    # the identity, but the routine stays correct for any SPD matrix.
    inv_diag = 1.0 / A.diagonal().clamp_min(torch.finfo(A.dtype).tiny)  # (d_in,)
    X = x0 * M
    R = rhs - X @ A  # A symmetric: row i of X @ A is (A x_i)^T
    start_objective = _objective(X, centre, R)
    R = R * M
    rhs_norm = (rhs * M).norm(dim=1).clamp_min(torch.finfo(A.dtype).tiny)  # (d_out,)
    threshold = rtol * rhs_norm
    active = R.norm(dim=1) > threshold  # rows still iterating
    Z = R * inv_diag
    P = Z.clone()
    rz = (R * Z).sum(dim=1)
    iterations = 0
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        iterations += 1
        AP = (P @ A) * M
        curvature = (P * AP).sum(dim=1)
        # Rows that stopped, or whose direction vanished, take no step.
        step = torch.where(active & (curvature > 0), rz / curvature.clamp_min(torch.finfo(A.dtype).tiny), 0.0)
        X = X + step[:, None] * P
        R = R - step[:, None] * AP
        active = active & (R.norm(dim=1) > threshold)
        Z = R * inv_diag
        rz_next = (R * Z).sum(dim=1)
        beta = torch.where(active, rz_next / rz.clamp_min(torch.finfo(A.dtype).tiny), 0.0)
        P = Z + beta[:, None] * P
        rz = rz_next
    # The true residual, not the recurrence's R: with an rtol near the compute dtype's precision R keeps
    # shrinking after the true residual has stopped, and the record would claim convergence it lacks.
    R = rhs - X @ A
    final_objective = _objective(X, centre, R)
    residual = (R * M).norm(dim=1) / rhs_norm
    return PcgOutcome(
        solution=X,
        iterations=iterations,
        converged_rows=int((residual <= rtol).sum()),
        max_rel_residual=float(residual.max()) if residual.numel() else 0.0,
        start_objective=start_objective,
        final_objective=final_objective,
    )


def _objective(X: torch.Tensor, centre: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor | None:
    """Per row (x - c) A (x - c)^T = -(x - c) . (c A - x A), from the full (unmasked) residual c A - x A."""
    if centre is None:
        return None
    return -((X - centre) * residual).sum(dim=1, dtype=torch.float64)
