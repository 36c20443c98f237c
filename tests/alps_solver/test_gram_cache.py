"""GramCache: layers that share H (q/k/v, gate/up) share what a method derives from H alone."""

from __future__ import annotations

import pytest
import torch

from alps_solver import GramCache, LayerProblem, method_names, solve
from alps_solver.baselines import sparsegpt

from .problems import correlated_inputs

PATTERN = "0.7"


def group(d_in: int = 32, d_outs: tuple[int, ...] = (16, 8, 8), seed: int = 0) -> list[LayerProblem]:
    """Layers reading one input: one H (the very tensor), a weight each, as a block's q/k/v."""
    g = torch.Generator().manual_seed(seed)
    X = correlated_inputs(256, d_in, g)
    shared = LayerProblem.from_inputs(torch.zeros(1, d_in, dtype=torch.float64), X)
    return [LayerProblem(weight=torch.randn(d, d_in, generator=g, dtype=torch.float64), gram=shared.gram,
                         input_mean=shared.input_mean, input_var=shared.input_var, n_tokens=shared.n_tokens)
            for d in d_outs]


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    calls = [0]
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("method", method_names())
def test_a_shared_cache_gives_the_same_results_as_separate_solves(method):
    problems = group()
    cache = GramCache()
    for problem in problems:
        alone = solve(problem, PATTERN, method=method)
        shared = solve(problem, PATTERN, method=method, cache=cache)
        assert torch.equal(shared.weight, alone.weight)
        assert torch.equal(shared.mask, alone.mask)
        assert shared.rel_error == alone.rel_error
        assert shared.iterations == alone.iterations


@pytest.mark.parametrize("method", ["alps", "alps-simple", "admm_fixed_rho"])
def test_alps_decomposes_a_shared_h_once_per_group(monkeypatch, method):
    eighs = count_calls(monkeypatch, torch.linalg, "eigh")
    cache = GramCache()
    for problem in group():
        solve(problem, PATTERN, method=method, cache=cache)
    assert eighs[0] == 1
    for problem in group(seed=1):  # another group's H: decomposed again, once
        solve(problem, PATTERN, method=method, cache=cache)
    assert eighs[0] == 2


def test_sparsegpt_factorises_a_shared_h_once_per_group(monkeypatch):
    factors = count_calls(monkeypatch, sparsegpt, "_inverse_cholesky")
    cache = GramCache()
    for problem in group():
        solve(problem, PATTERN, method="sparsegpt", cache=cache)
    assert factors[0] == 1


def test_an_equal_h_in_another_tensor_is_reused(monkeypatch):
    eighs = count_calls(monkeypatch, torch.linalg, "eigh")
    first, second, _ = group()
    copy = LayerProblem(weight=second.weight, gram=second.gram.clone())
    cache = GramCache()
    solve(first, PATTERN, cache=cache)
    result = solve(copy, PATTERN, cache=cache)
    assert eighs[0] == 1
    assert torch.equal(result.weight, solve(copy, PATTERN).weight)


def test_a_different_h_is_not_served_from_the_cache():
    first, _, _ = group()
    other = group(seed=3)[0]
    cache = GramCache()
    solve(first, PATTERN, cache=cache)
    assert torch.equal(solve(other, PATTERN, cache=cache).weight, solve(other, PATTERN).weight)


# Each setting alone: the cache holds this very H, derived under the defaults, when the changed one arrives.
@pytest.mark.parametrize("method", ["alps", "admm_fixed_mask", "sparsegpt"])
@pytest.mark.parametrize("changed", [{"damping": 0.05}, {"compute_dtype": "float64"}])
def test_a_different_damping_or_compute_dtype_is_derived_again(method, changed):
    problem = group()[0]
    cache = GramCache()
    solve(problem, PATTERN, method=method, cache=cache)
    got = solve(problem, PATTERN, method=method, config=changed, cache=cache)
    want = solve(problem, PATTERN, method=method, config=changed)
    assert torch.equal(got.weight, want.weight)
    assert not torch.equal(want.weight, solve(problem, PATTERN, method=method).weight)  # the setting matters


def test_inference_tensors_are_cached_too(monkeypatch):
    # The pipeline accumulates H under torch.inference_mode: such tensors keep no version counter.
    with torch.inference_mode():
        problems = [LayerProblem(weight=p.weight.clone(), gram=p.gram.clone()) for p in group()[:2]]
    problems[1] = LayerProblem(weight=problems[1].weight, gram=problems[0].gram)
    eighs = count_calls(monkeypatch, torch.linalg, "eigh")
    cache = GramCache()
    results = [solve(problem, PATTERN, cache=cache) for problem in problems]
    assert eighs[0] == 1
    assert torch.equal(results[1].weight, solve(problems[1], PATTERN).weight)


def test_an_h_modified_in_place_after_caching_is_derived_again():
    first, second, _ = group()
    cache = GramCache()
    solve(first, PATTERN, cache=cache)
    second.gram.mul_(2.0).diagonal().add_(1.0)  # the same tensor object, new values
    got = solve(second, PATTERN, cache=cache)
    fresh = LayerProblem(weight=second.weight, gram=second.gram.clone())
    assert torch.equal(got.weight, solve(fresh, PATTERN).weight)


def test_the_cache_keeps_only_the_latest_h():
    cache = GramCache()
    for seed in range(3):
        problem = group(seed=seed)[0]
        cache.get(problem.gram, "value", lambda seed=seed: seed)
        assert cache.get(problem.gram, "value", lambda: -1) == seed  # a hit for the H just given
    assert cache.get(group(seed=0)[0].gram, "value", lambda: -1) == -1  # the first H was dropped
