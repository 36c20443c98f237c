"""The fixed-rho ablation behaves as the ALPS paper describes (Section 5, penalty ablation)."""

from __future__ import annotations

import pytest
import torch

from alps_solver import Status, solve
from alps_solver.baselines.admm_fixed_rho import Config

from .test_alps import random_problem


@pytest.fixture(scope="module")
def problem():
    return random_problem(128, 256, 1024, seed=3, dtype=torch.float32)


@pytest.mark.parametrize("pattern", ["0.7", "0.9"])
def test_small_rho_keeps_changing_its_support(problem, pattern):
    result = solve(problem, pattern, "admm_fixed_rho", {"rho": 0.3, "max_iter": 90})
    assert result.status is Status.MAX_ITER
    assert all(h.rho == 0.3 for h in result.history) and result.rho_updates == []
    # still swapping more than 1% of the kept weights at every check, to the very end
    assert min(h.support_change_frac for h in result.history) > 0.01


@pytest.mark.parametrize("pattern", ["0.7", "0.9"])
def test_large_rho_freezes_early_with_a_worse_error_than_alps(problem, pattern):
    fixed = solve(problem, pattern, "admm_fixed_rho", {"rho": 3.0})
    adaptive = solve(problem, pattern, "alps")
    assert fixed.status is Status.CONVERGED and fixed.iterations <= 60
    assert fixed.history[-1].support_change_frac < 3e-4  # the support is (almost) frozen
    assert fixed.rel_error > 1.1 * adaptive.rel_error


def test_config_validation():
    with pytest.raises(ValueError, match="rho"):
        Config(rho=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        Config(max_iter=0)
