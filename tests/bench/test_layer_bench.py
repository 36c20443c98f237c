"""The layer benchmark's FLOP count of the ADMM iterations matches the products the solver really runs."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from alps_solver import LayerProblem, SparsityPattern
from alps_solver.admm import RhoSchedule, run_admm
from alps_solver.problem import ScaledProblem, gram_matrix_flops
from bench.layer_bench import admm_flops

_PRODUCTS = {torch.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.matmul, torch.Tensor.mm}


class _CountProducts(TorchFunctionMode):
    """Records the FLOPs of every matrix product of two 2-D tensors run inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0.0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _PRODUCTS and args[0].dim() == 2 and args[1].dim() == 2:
            (rows, inner), columns = args[0].shape, args[1].shape[1]
            self.flops += 2.0 * rows * inner * columns
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("pattern", ["0.7", "2:4"])
@pytest.mark.parametrize("max_iter,schedule", [
    (7, RhoSchedule()),  # stops between two checks: the last update is used
    (9, RhoSchedule()),  # stops at a check: its update is never used
    (300, RhoSchedule()),  # runs to convergence
    (30, RhoSchedule(rho_max=0.12)),  # rho hits the cap: later updates leave it unchanged
])
def test_admm_flops_equals_the_products_the_iterations_run(pattern, max_iter, schedule) -> None:
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(256, 32, generator=generator, dtype=torch.float64) @ torch.randn(
        32, 32, generator=generator, dtype=torch.float64)
    problem = LayerProblem(weight=torch.randn(24, 32, generator=generator, dtype=torch.float64), gram=X.T @ X)
    scaled = ScaledProblem.build(problem, 0.01, torch.float64)
    counter = _CountProducts()
    with counter:
        outcome = run_admm(scaled, SparsityPattern.parse(pattern), schedule, max_iter=max_iter)
    assert len(outcome.rho_updates) > 1  # the schedule did change rho
    if schedule.rho_max < 1:
        assert any(u.new == u.old for u in outcome.rho_updates)  # a capped update that changed nothing
    assert admm_flops(outcome, 24, 32) == counter.flops


def test_admm_flops_counts_the_panels_of_a_wide_inverse() -> None:
    """At d_in = 800 (H + rho I)^-1 is formed from two panels, about 3/4 of a full product."""
    generator = torch.Generator().manual_seed(1)
    d_in = 800
    X = torch.randn(1000, d_in, generator=generator, dtype=torch.float64)
    problem = LayerProblem(weight=torch.randn(8, d_in, generator=generator, dtype=torch.float64), gram=X.T @ X)
    scaled = ScaledProblem.build(problem, 0.01, torch.float64)
    counter = _CountProducts()
    with counter:
        outcome = run_admm(scaled, SparsityPattern.parse("0.7"), RhoSchedule(), max_iter=7)
    assert len(outcome.rho_updates) >= 1
    assert admm_flops(outcome, 8, d_in) == counter.flops
    assert gram_matrix_flops(d_in, d_in) == pytest.approx(0.75 * 2 * d_in**3, rel=0.01)
