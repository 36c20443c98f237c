"""Projection onto each pattern: the fast selection paths give exact top-k sets, ties included."""

import pytest
import torch

from alps_solver import SparsityPattern


def _reference_unstructured(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(scores.reshape(-1), descending=True, stable=True).indices
    return torch.zeros(scores.numel(), dtype=torch.bool).index_fill_(0, order[:k], True).reshape(scores.shape)


def _kth_largest(scores: torch.Tensor, k: int) -> float:
    return float(torch.sort(scores.reshape(-1), descending=True).values[k - 1])


def _assert_top_k_set(scores: torch.Tensor, mask: torch.Tensor, k: int) -> None:
    """Exactly k kept, and no dropped entry scores higher than a kept one."""
    assert int(mask.sum()) == k
    assert float(scores[~mask].max()) <= float(scores[mask].min())


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9, 0.99])
@pytest.mark.parametrize("shape", [(1536, 576), (320, 1000)])
def test_unstructured_selection_is_the_top_k_set(shape, sparsity):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).square()
    pattern = SparsityPattern.unstructured(sparsity)
    k = pattern.kept_count(*shape)
    mask = pattern.select(scores)
    assert torch.equal(mask, _reference_unstructured(scores, k))  # distinct scores: the set is unique


@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_unstructured_selection_with_many_ties(sparsity):
    # Scores on a coarse grid: the k-th largest value is shared by thousands of entries.
    scores = torch.randint(0, 7, (700, 300), generator=torch.Generator().manual_seed(1)).to(torch.float32)
    pattern = SparsityPattern.unstructured(sparsity)
    k = pattern.kept_count(700, 300)
    mask = pattern.select(scores)
    _assert_top_k_set(scores, mask, k)
    assert float(scores[mask].min()) == _kth_largest(scores, k)


def test_unstructured_selection_of_a_mostly_zero_matrix():
    scores = torch.zeros(512, 512)
    scores[::7, ::3] = torch.rand(scores[::7, ::3].shape, generator=torch.Generator().manual_seed(2)) + 0.5
    pattern = SparsityPattern.unstructured(0.9)
    _assert_top_k_set(scores, pattern.select(scores), pattern.kept_count(512, 512))


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (4, 8), (3, 16), (5, 32)])
def test_n_m_selection_is_the_top_n_of_every_group(n, m):
    scores = torch.randn(96, 64 * m // 4, generator=torch.Generator().manual_seed(3)).abs()
    mask = SparsityPattern.n_m(n, m).select(scores)
    groups, kept = scores.reshape(96, -1, m), mask.reshape(96, -1, m)
    assert bool((kept.sum(dim=-1) == n).all())
    reference = torch.zeros_like(kept).scatter_(-1, torch.topk(groups, n, dim=-1).indices, True)
    assert torch.equal(kept, reference)


def test_n_m_selection_with_ties_keeps_exactly_n():
    scores = torch.ones(64, 128)
    scores[:, ::8] = 2.0  # one clear winner and three tied runners-up in every group of 4
    kept = SparsityPattern.n_m(2, 4).select(scores).reshape(64, -1, 4)
    assert bool((kept.sum(dim=-1) == 2).all())
    assert bool(kept[:, ::2, 0].all())  # the group holding a 2.0 keeps it
