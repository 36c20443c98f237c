"""Sparsity allocation (tasks/blockwise/allocation.py): OWL's outlier ratio and block sparsities on hand-checked
cases, bounds that keep the average, and layer sparsities that add up to the target to the weight."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from tasks.blockwise.allocation import (
    BlockOutliers,
    allocate_sparsity,
    block_sparsities,
    exact_layer_sparsities,
    outlier_ratio,
)
from tasks.config.prune import AllocationSpec, SolverSpec


def test_outlier_ratio_counts_scores_above_m_times_the_blocks_mean():
    # Two layers of one block: scores 1, 1, 1 | 1, 10; the mean is 2.8, so with M = 2 only the 10 (> 5.6) counts.
    scores = [torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[1.0], [10.0]])]
    assert outlier_ratio(scores, 2.0) == pytest.approx(1 / 5)
    assert outlier_ratio(scores, 4.0) == 0.0  # 10 < 11.2
    assert outlier_ratio(scores, 0.5) == pytest.approx(1 / 5)  # 1 > 1.4 is false too
    assert outlier_ratio(scores, 0.3) == pytest.approx(1.0)


def test_more_outliers_keep_more_weights_and_the_sparsities_average_the_target():
    # Ratios 1%, 2%, 3% spread to r = 0, 0.1, 0.2 (2 lambda = 0.2) around the target: 0.6, 0.5, 0.4.
    spec = AllocationSpec(method="owl", spread=0.1)
    sparsities = block_sparsities([0.01, 0.02, 0.03], [100, 100, 100], spec, 0.5)
    assert sparsities == pytest.approx([0.6, 0.5, 0.4])


def test_bounds_clip_and_one_shift_restores_the_average():
    # With at most 0.55: 0.6 + c is clipped, (0.55 + 0.5 + c + 0.4 + c) / 3 = 0.5 gives c = 0.025.
    spec = AllocationSpec(method="owl", spread=0.1, max_sparsity=0.55)
    sparsities = block_sparsities([0.01, 0.02, 0.03], [100, 100, 100], spec, 0.5)
    assert sparsities == pytest.approx([0.55, 0.525, 0.425], abs=1e-9)
    # Unequal block sizes: the average is over weights.
    weighted = block_sparsities([0.01, 0.03], [300, 100], AllocationSpec(method="owl", spread=0.1), 0.5)
    assert (300 * weighted[0] + 100 * weighted[1]) / 400 == pytest.approx(0.5)
    assert weighted[0] > weighted[1]


def test_blocks_alike_all_get_the_target():
    assert block_sparsities([0.02, 0.02], [10, 10], AllocationSpec(method="owl"), 0.7) == pytest.approx([0.7, 0.7])


def test_layer_sparsities_are_whole_weights_adding_up_to_the_target_exactly():
    shapes = [{"q": [7, 13], "down": [13, 29]}, {"q": [7, 13], "down": [13, 29]}, {"q": [7, 13], "down": [13, 29]}]
    blocks = [0.61, 0.7, 0.79]
    layers = exact_layer_sparsities(blocks, shapes, 0.7)
    sizes = [math.prod(shape) for block in shapes for shape in block.values()]
    zeros = [layers[b][name] * math.prod(shape) for b, block in enumerate(shapes) for name, shape in block.items()]
    assert all(abs(z - round(z)) < 1e-9 for z in zeros)  # whole weights
    assert round(sum(zeros)) == round(0.7 * sum(sizes))  # exactly the target's zeros
    for b, block in enumerate(shapes):
        for name, shape in block.items():
            assert abs(layers[b][name] - blocks[b]) * math.prod(shape) <= 1.0 + 1e-9  # within one weight


def test_uniform_allocation_gives_every_layer_the_target_to_the_weight():
    outliers = [BlockOutliers(shapes={"a": [3, 5], "b": [5, 7]}, outlier_ratio=0.0) for _ in range(2)]
    allocation = allocate_sparsity("k", AllocationSpec(), 0.5, outliers)
    assert allocation.block_sparsity == [0.5, 0.5] and allocation.outlier_ratios == []
    assert allocation.achieved == pytest.approx(round(0.5 * 100) / 100)


@pytest.mark.parametrize(("settings", "field", "says"), [
    ({"allocation": {"method": "owl"}, "pattern": "2:4"}, "pattern", "give a fraction"),
    ({"allocation": {"method": "owl"}, "pattern": "rows:0.5"}, "pattern", "give a fraction"),
    ({"allocation": {"method": "owl", "max_sparsity": 0.6}, "pattern": "0.7"}, "pattern", "outside the allocation"),
    ({"allocation": {"method": "owl", "min_sparsity": 0.8, "max_sparsity": 0.6}}, "max_sparsity", "below min"),
    ({"allocation": {"method": "lamp"}}, "allocation.method", "uniform"),
    ({"allocation": {"spread": 1.0}}, "allocation.spread", "less than 1"),
])
def test_bad_allocation_settings_are_refused(settings, field, says):
    with pytest.raises(ValidationError) as error:
        SolverSpec(**settings)
    assert says in str(error.value) and field in str(error.value)
