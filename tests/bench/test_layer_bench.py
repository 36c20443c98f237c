"""The layer benchmark's FLOP count of the ADMM iterations matches the inverse builds the solver really ran."""

from __future__ import annotations

import pytest
import torch

from alps_solver import LayerProblem, admm, solve
from alps_solver.alps import Config
from bench.layer_bench import admm_flops


@pytest.mark.parametrize("pattern", ["0.7", "2:4"])
@pytest.mark.parametrize("max_iter", [7, 9, 300])  # stops between checks, at a check, and converged
def test_admm_flops_counts_every_inverse_build(monkeypatch, pattern, max_iter) -> None:
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(256, 32, generator=generator, dtype=torch.float64) @ torch.randn(
        32, 32, generator=generator, dtype=torch.float64)
    problem = LayerProblem(weight=torch.randn(24, 32, generator=generator, dtype=torch.float64), gram=X.T @ X)
    builds = []

    class CountingInverse(admm._Inverse):
        def at(self, rho):
            if rho != self.rho:
                builds.append(rho)
            return super().at(rho)

    monkeypatch.setattr(admm, "_Inverse", CountingInverse)
    result = solve(problem, pattern, method="alps", config=Config(max_iter=max_iter))
    assert len(builds) > 1  # the schedule did change rho
    # One weight step per iteration and one error product per check, each (24, 32) x (32, 32).
    products = result.iterations + len(result.history)
    assert admm_flops(result, 24, 32) == 2.0 * 32 * 32 * (products * 24 + len(builds) * 32)
