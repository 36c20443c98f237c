"""Dense targets: a layer problem with the cross Gram K = X_p^T X_d aims at the dense model's output.

The reduction to target weights W* is checked against direct least squares, and the methods that read H
solve it to a lower dense-target error than the same method aiming at its own output.
"""

from __future__ import annotations

import pytest
import torch

from alps_solver import LayerProblem, SparsityPattern, solve

from .problems import correlated_inputs

F64 = {"compute_dtype": "float64"}


def inputs_pair(n_tokens: int = 400, d_in: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(X_d, X_p): dense-model inputs and the pruned model's, which drifted from them (an upstream error)."""
    g = torch.Generator().manual_seed(seed)
    X_d = correlated_inputs(n_tokens, d_in, g)
    drift = 0.3 * correlated_inputs(n_tokens, d_in, g) + 0.2 * X_d @ torch.randn(d_in, d_in, generator=g,
                                                                                  dtype=torch.float64) / d_in ** 0.5
    return X_d, X_d + drift


def dense_target_problem(d_out: int = 12, d_in: int = 24, seed: int = 0) -> tuple[LayerProblem, torch.Tensor,
                                                                                  torch.Tensor]:
    X_d, X_p = inputs_pair(d_in=d_in, seed=seed)
    W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    problem = LayerProblem(weight=W, gram=X_p.T @ X_p, cross=X_p.T @ X_d, n_tokens=X_p.shape[0])
    return problem, X_p, X_d


def dense_target_error(W_hat: torch.Tensor, W: torch.Tensor, X_p: torch.Tensor, X_d: torch.Tensor) -> float:
    """||X_p W_hat^T - X_d W^T||^2, computed from the inputs themselves."""
    return float((X_p @ W_hat.T - X_d @ W.T).square().sum())


def test_target_weights_are_the_least_squares_solution():
    problem, X_p, X_d = dense_target_problem()
    target = problem.reduced(ridge=0.0).weight
    direct = torch.linalg.lstsq(X_p, X_d @ problem.weight.T).solution.T  # argmin ||X_p W^T - X_d W0^T||
    torch.testing.assert_close(target, direct, rtol=1e-8, atol=1e-9)


def test_reduced_objective_differs_by_a_constant():
    problem, X_p, X_d = dense_target_problem()
    reduced = problem.reduced(ridge=0.0)
    g = torch.Generator().manual_seed(5)
    gaps = []
    for _ in range(4):
        W_hat = torch.randn(problem.weight.shape, generator=g, dtype=torch.float64)
        E = W_hat - reduced.weight
        own = float(((E @ reduced.gram) * E).sum())  # ||X_p (W_hat - W*)^T||^2 from H alone
        gaps.append(dense_target_error(W_hat, problem.weight, X_p, X_d) - own)
    assert max(gaps) - min(gaps) < 1e-8 * abs(gaps[0]) + 1e-8


def test_equal_inputs_give_the_dense_weights_back():
    X_d, _ = inputs_pair()
    W = torch.randn(5, X_d.shape[1], dtype=torch.float64)
    H = X_d.T @ X_d
    reduced = LayerProblem(weight=W, gram=H, cross=H).reduced()
    torch.testing.assert_close(reduced.weight, W, rtol=1e-9, atol=1e-10)
    plain = LayerProblem(weight=W, gram=H)
    assert plain.reduced() is plain


def test_ridge_pulls_unseen_inputs_toward_the_dense_weights():
    # Channel 0 never carries a signal: H and K say nothing about it, so its target weight stays W's.
    X_d, X_p = inputs_pair()
    X_d, X_p = X_d.clone(), X_p.clone()
    X_d[:, 0] = 0.0
    X_p[:, 0] = 0.0
    W = torch.randn(4, X_d.shape[1], dtype=torch.float64)
    reduced = LayerProblem(weight=W, gram=X_p.T @ X_p, cross=X_p.T @ X_d).reduced()
    torch.testing.assert_close(reduced.weight[:, 0], W[:, 0])
    assert torch.isfinite(reduced.weight).all()


def test_fixed_support_solve_equals_row_by_row_least_squares():
    # Without the ridge and damping, the backsolve on ALPS's support is the exact least-squares fit of the dense
    # model's outputs from the pruned inputs, row by row.
    problem, X_p, X_d = dense_target_problem()
    pattern = SparsityPattern.unstructured(0.5)
    result = solve(problem.reduced(ridge=0.0), pattern, method="alps",
                   config={**F64, "damping": 0.0, "pcg_max_iter": 200, "pcg_rtol": 1e-12})
    target = X_d @ problem.weight.T  # (n_tokens, d_out): the dense model's outputs
    for i in range(problem.d_out):
        kept = result.mask[i]
        row = torch.zeros(problem.d_in, dtype=torch.float64)
        row[kept] = torch.linalg.lstsq(X_p[:, kept], target[:, i : i + 1]).solution[:, 0]
        torch.testing.assert_close(result.weight[i], row, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("method", ["alps", "sparsegpt", "wanda", "dsnot"])
def test_dense_targets_lower_the_dense_target_error(method):
    problem, X_p, X_d = dense_target_problem(d_out=16, d_in=32, seed=1)
    X = X_p
    stats = {"input_mean": X.mean(dim=0), "input_var": X.var(dim=0, unbiased=False)}
    corrected = LayerProblem(weight=problem.weight, gram=problem.gram, cross=problem.cross, **stats)
    own = LayerProblem(weight=problem.weight, gram=problem.gram, **stats)
    config = F64 if method != "wanda" else None
    pattern = SparsityPattern.unstructured(0.6)
    aimed = solve(corrected, pattern, method=method, config=config)
    plain = solve(own, pattern, method=method, config=config)
    assert int((aimed.weight == 0).sum()) == int((plain.weight == 0).sum())  # the same sparsity
    assert (dense_target_error(aimed.weight, problem.weight, X_p, X_d)
            < dense_target_error(plain.weight, problem.weight, X_p, X_d))


def test_magnitude_refuses_dense_targets():
    problem, _, _ = dense_target_problem()
    with pytest.raises(ValueError, match="magnitude ignores the calibration inputs"):
        solve(problem, "0.5", method="magnitude")


@pytest.mark.parametrize(("cross", "match"), [
    (torch.zeros(3, 3, dtype=torch.float64), r"cross must be the \(24, 24\)"),
    (torch.zeros(24, 24, dtype=torch.float16), "cross must be float32 or float64"),
    (torch.full((24, 24), float("nan"), dtype=torch.float64), "cross has non-finite"),
])
def test_bad_cross_is_refused(cross, match):
    problem, _, _ = dense_target_problem()
    with pytest.raises(ValueError, match=match):
        LayerProblem(weight=problem.weight, gram=problem.gram, cross=cross)
