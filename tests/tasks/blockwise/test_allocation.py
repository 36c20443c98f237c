"""Sparsity allocation (tasks/blockwise/allocation.py): OWL's outlier ratio and block sparsities on hand-checked
cases, bounds that keep the average, and layer sparsities that add up to the target to the weight."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from tasks.blockwise.allocation import (
    BlockMeasurement,
    allocate_sparsity,
    block_sparsities,
    curve_at,
    error_sparsities,
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
    layers = exact_layer_sparsities([{name: s for name in block} for block, s in zip(shapes, blocks)], shapes, 0.7)
    sizes = [math.prod(shape) for block in shapes for shape in block.values()]
    zeros = [layers[b][name] * math.prod(shape) for b, block in enumerate(shapes) for name, shape in block.items()]
    assert all(abs(z - round(z)) < 1e-9 for z in zeros)  # whole weights
    assert round(sum(zeros)) == round(0.7 * sum(sizes))  # exactly the target's zeros
    for b, block in enumerate(shapes):
        for name, shape in block.items():
            assert abs(layers[b][name] - blocks[b]) * math.prod(shape) <= 1.0 + 1e-9  # within one weight


def test_the_error_grid_spans_target_plus_minus_lambda_within_the_bounds():
    assert AllocationSpec(method="error", spread=0.1).error_grid(0.6) == pytest.approx([0.5, 0.55, 0.6, 0.65, 0.7])
    clipped = AllocationSpec(method="error", spread=0.1, max_sparsity=0.62)
    assert clipped.error_grid(0.6) == pytest.approx([0.5, 0.53, 0.56, 0.59, 0.62])
    assert AllocationSpec(method="error", spread=0.0).error_grid(0.6) == [0.6]


def test_sparsity_goes_to_the_unit_that_loses_least_per_weight():
    # Grid 0.4, 0.5, 0.6; A's error rises by 0.1 per 0.1 of sparsity, B's by 1. Equal sizes: A takes all it can.
    grid = [0.4, 0.5, 0.6]
    cheap, dear = [0.0, 0.1, 0.2], [0.0, 1.0, 2.0]
    assert error_sparsities([cheap, dear], [100, 100], grid, 0.5) == pytest.approx([0.6, 0.4])
    # A with 100 weights gives at most 20 of the 40 zeros beyond 0.4; B, with 300, the other 20: 0.4 + 20/300.
    step = 0.2 / 64
    found = error_sparsities([cheap, dear], [100, 300], grid, 0.5)
    assert found[0] == pytest.approx(0.6) and abs(found[1] - (0.4 + 20 / 300)) <= step
    # Per weight, not per unit: B's error per pruned weight is 1 / 1000, A's 0.1 / 10.
    assert error_sparsities([cheap, dear], [10, 1000], grid, 0.5)[1] > 0.5
    # A measured curve that dips counts as flat there (pruning more never costs less).
    assert error_sparsities([[0.0, 0.5, 0.4], dear], [100, 100], grid, 0.5) == pytest.approx([0.6, 0.4])


def test_the_error_allocation_never_loses_to_uniform_on_convex_curves():
    generator = torch.Generator().manual_seed(0)
    grid = [0.6, 0.65, 0.7, 0.75, 0.8]
    for _ in range(20):
        scale = torch.rand(6, generator=generator, dtype=torch.float64) + 0.1
        power = 1 + 3 * torch.rand(6, generator=generator, dtype=torch.float64)
        curves = [[float(a * (0.2 + s) ** p) for s in grid] for a, p in zip(scale, power)]
        sizes = [int(n) for n in torch.randint(50, 500, (6,), generator=generator)]
        found = error_sparsities(curves, sizes, grid, 0.7)
        assert sum(n * s for n, s in zip(sizes, found)) / sum(sizes) == pytest.approx(0.7, abs=0.2 / 64)
        chosen = sum(curve_at(grid, curve, x) for curve, x in zip(curves, found))
        assert chosen <= sum(curve_at(grid, curve, 0.7) for curve in curves) + 1e-9


def test_error_allocation_by_layer_and_by_block():
    # Block 0: layer a cheap, b dear; block 1: both dear. By layer, a takes the sparsity; by block, block 0 does.
    grid = [0.4, 0.45, 0.5, 0.55, 0.6]
    cheap, dear = [0.0, 0.05, 0.1, 0.15, 0.2], [0.0, 0.5, 1.0, 1.5, 2.0]
    measured = [BlockMeasurement(shapes={"a": [10, 10], "b": [10, 10]}, errors={"a": cheap, "b": dear}),
                BlockMeasurement(shapes={"a": [10, 10], "b": [10, 10]}, errors={"a": dear, "b": dear})]
    by_layer = allocate_sparsity("k", AllocationSpec(method="error", spread=0.1, granularity="layer"), 0.5, measured)
    assert by_layer.layers[0]["a"] == pytest.approx(0.6) and by_layer.layers[1]["a"] < 0.5
    assert by_layer.error_grid == pytest.approx(grid) and by_layer.layer_errors[0]["a"] == cheap
    by_block = allocate_sparsity("k", AllocationSpec(method="error", spread=0.1, granularity="block"), 0.5, measured)
    assert by_block.layers[0] == pytest.approx({"a": 0.6, "b": 0.6}) and by_block.layers[1] == {"a": 0.4, "b": 0.4}
    assert by_block.block_sparsity == pytest.approx([0.6, 0.4])
    assert by_layer.achieved == by_block.achieved == pytest.approx(0.5)
    # Within each block: a takes block 0's share of the sparsity; block 1's layers, alike and convex, share it.
    convex = [0.0, 0.2, 0.6, 1.2, 2.0]
    measured[1] = BlockMeasurement(shapes={"a": [10, 10], "b": [10, 10]}, errors={"a": convex, "b": convex})
    in_block = allocate_sparsity("k", AllocationSpec(method="error", spread=0.1, granularity="layer-in-block"), 0.5,
                                 measured)
    assert in_block.layers == [pytest.approx({"a": 0.6, "b": 0.4}), pytest.approx({"a": 0.5, "b": 0.5})]
    assert in_block.block_sparsity == pytest.approx([0.5, 0.5])


def test_uniform_allocation_gives_every_layer_the_target_to_the_weight():
    outliers = [BlockMeasurement(shapes={"a": [3, 5], "b": [5, 7]}, outlier_ratio=0.0) for _ in range(2)]
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
    ({"allocation": {"method": "owl", "granularity": "block"}}, "allocation.granularity", "add method 'error'"),
    ({"allocation": {"method": "error", "granularity": "row"}}, "allocation.granularity",
     "'layer', 'block' or 'layer-in-block'"),
    ({"allocation": {"method": "error"}, "pattern": "2:4"}, "pattern", "give a fraction"),
])
def test_bad_allocation_settings_are_refused(settings, field, says):
    with pytest.raises(ValidationError) as error:
        SolverSpec(**settings)
    assert says in str(error.value) and field in str(error.value)
