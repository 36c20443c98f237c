"""Seeded layer problems with inputs shaped like a transformer layer's, shared by the solver tests.

Calibration inputs of a real layer are correlated across channels, have a non-zero mean per channel and a
few channels of much larger scale ("outlier features", Dettmers et al. 2022); weights are heavier-tailed
than a Gaussian. Those are the properties that separate the methods: outlier channels are what Wanda
sees and magnitude pruning misses, correlations are what SparseGPT and ALPS exploit and Wanda ignores.
"""

from __future__ import annotations

import math

import torch

from alps_solver import LayerProblem

__all__ = ["SUITE_SEEDS", "correlated_inputs", "correlated_problem", "correlated_suite"]

# The pinned suite: 64 x 128 layers seen through 512 tokens. Tests assert bounds measured on exactly
# these problems: changing a seed, a shape or a default of correlated_inputs means measuring again.
SUITE_SEEDS = (0, 1, 2, 3, 4)
SUITE_SHAPE = (64, 128)
SUITE_TOKENS = 512


def correlated_inputs(
    n_tokens: int,
    d_in: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float64,
    rank: int | None = None,
    shared: float = 0.5,
    scale_spread: float = 3.0,
    outlier_fraction: float = 0.05,
    outlier_scale: float = 6.0,
) -> torch.Tensor:
    """X (n_tokens, d_in): correlated, uneven in scale, with a non-zero mean per channel.

    X = (Z L + 1 mu^T) diag(c). The rows of Z (n_tokens, d_in) are standard normal. The mixing
    L = I + (shared / rank) F^T F, with F (rank, d_in) standard normal and ``rank`` = d_in // 4 by default,
    correlates the channels through a few latent factors (the identity keeps every channel partly its own,
    so H stays well posed). mu (d_in,) gives every channel a mean. c scales the channels log-uniformly
    over a factor ``scale_spread``, and an ``outlier_fraction`` of them by a further ``outlier_scale``.
    With the defaults, the suite's mean errors at 50% sparsity are about magnitude 0.026, Wanda 0.009,
    SparseGPT 0.005, ALPS 0.003 (0.26, 0.11, 0.10, 0.06 at 90%): clear gaps, none of them degenerate.
    """
    rank = rank if rank is not None else max(1, d_in // 4)
    F = torch.randn(rank, d_in, generator=generator, dtype=dtype)
    L = torch.eye(d_in, dtype=dtype) + (shared / rank) * F.T @ F  # (d_in, d_in)
    mu = 0.5 * torch.randn(d_in, generator=generator, dtype=dtype)
    c = torch.exp(math.log(scale_spread) * torch.rand(d_in, generator=generator, dtype=dtype))
    outliers = torch.randperm(d_in, generator=generator)[: max(1, round(outlier_fraction * d_in))]
    c[outliers] *= outlier_scale
    Z = torch.randn(n_tokens, d_in, generator=generator, dtype=dtype)
    return (Z @ L + mu) * c


def correlated_problem(
    d_out: int, d_in: int, n_tokens: int, seed: int, dtype: torch.dtype = torch.float64
) -> LayerProblem:
    """A seeded layer problem: heavy-tailed W (d_out, d_in) and ``correlated_inputs``.

    H, input_mean and input_var are accumulated in float64 from X, then stored in ``dtype`` (float32 or
    float64; a half-precision ``dtype`` applies to the weight only, H staying float32).
    """
    g = torch.Generator().manual_seed(seed)
    X = correlated_inputs(n_tokens, d_in, g)
    # Student-t (3 degrees of freedom) weights: a few large entries, like trained layers.
    W = _student_t(d_out, d_in, g) / math.sqrt(d_in)
    stats_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    return LayerProblem(
        weight=W.to(dtype),
        gram=(X.T @ X).to(stats_dtype),
        input_mean=X.mean(dim=0).to(stats_dtype),
        input_var=X.var(dim=0, unbiased=False).to(stats_dtype),
        n_tokens=n_tokens,
    )


def correlated_suite(
    seeds: tuple[int, ...] = SUITE_SEEDS, dtype: torch.dtype = torch.float64
) -> list[LayerProblem]:
    """The pinned suite the solver comparisons run on: one 64 x 128, 512-token problem per seed."""
    return [correlated_problem(*SUITE_SHAPE, SUITE_TOKENS, seed, dtype) for seed in seeds]


def _student_t(d_out: int, d_in: int, generator: torch.Generator, dof: int = 3) -> torch.Tensor:
    """Student-t samples from the seeded generator: a normal over the root of a scaled chi-square."""
    normal = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)
    chi2 = torch.randn(dof, d_out, d_in, generator=generator, dtype=torch.float64).square().sum(dim=0)
    return normal / (chi2 / dof).sqrt()
