"""Sparsity allocation: how a run's target sparsity is spread over the decoder blocks and their layers.

Uniform allocation gives every layer the target. OWL (outlier-weighted layerwise sparsity, Yin et al. 2023,
arXiv 2310.05175) measures each block's *outlier ratio* on the dense model: the fraction of its weights whose
Wanda score |W_ij| ||x_j|| exceeds M times the block's mean score (all its linear layers together, x the
dense model's calibration inputs of the layer). Blocks with more outliers keep more weights:

    r_b = 2 lambda (D_b - min D) / (max D - min D),     s_b = S + mean(r) - r_b,

so the block sparsities s_b span 2 lambda around the target S and average to it. Bounds on any layer's
sparsity clip the s_b, and a common shift restores the average (weighted by the blocks' weight counts).
Finally every layer gets a whole number of pruned weights, the remainders handed out so that the decoder
linears hold exactly round(S x their weights) zeros.

Error-driven allocation measures instead what pruning costs each layer: on the dense model's calibration
inputs, the relative error ||X(W_hat - W)^T||^2 / ||X W^T||^2 of SparseGPT (one OBS pass, far cheaper than
ALPS and ranking layers alike) at a few sparsities spanning the target +- lambda (within the bounds). On
those curves, linearly interpolated and made non-decreasing, sparsity is handed out greedily in small steps,
each to the unit (a layer, or a whole block) whose error rises least per weight pruned, until the decoder
linears hold the target's zeros: the minimum of the summed relative errors when the curves are convex.
Every layer can so get its own sparsity (attention and MLP differ most), every block one of its own, or
every layer its own with each block holding the target (the layers of a block share it).

The measurements come from one forward pass of the dense model over the calibration inputs, block by block
(``measure_blocks``); the rest is arithmetic on them (``allocate_sparsity``).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from transformers import AutoConfig

from alps_solver import SparsityPattern
from alps_solver.methods import solve
from alps_solver.problem import GramCache

from ..common.files import atomic_write_json
from ..config.prune import AllocationSpec
from ..model.adapters import block_layer_type, build_block
from ..model.loading import resolve_device
from ..model.prepared import PreparedModel
from .capture import BlockInputs, load_block_inputs, run_block
from .gram import collect_layer_problems, discover_groups
from .records import FileRecord

__all__ = ["Allocation", "BlockMeasurement", "allocate_sparsity", "block_sparsities", "curve_at",
           "error_sparsities", "exact_layer_sparsities", "measure_blocks", "outlier_ratio"]

logger = logging.getLogger(__name__)

ERROR_STEPS = 64  # steps of the greedy hand-out across the error grid (the curves interpolated between points)


class BlockMeasurement(BaseModel):
    """One block's linear layers (name -> [d_out, d_in]) and what the allocation measured of it on the dense
    model: OWL's outlier ratio, or each layer's relative error at the error grid's sparsities."""

    model_config = ConfigDict(frozen=True)

    shapes: dict[str, list[int]]
    outlier_ratio: float = 0.0
    errors: dict[str, list[float]] = {}


class Allocation(BaseModel):
    """The sparsity of every layer of every block, and what it was derived from."""

    model_config = ConfigDict(frozen=True)

    key: str  # the cache key it was computed under
    method: str
    target: float
    outlier_ratios: list[float]  # per block (OWL's D_b); empty otherwise
    block_sparsity: list[float]  # per block (its layers' weighted mean), before the rounding to whole weights
    layers: list[dict[str, float]]  # per block: layer name -> its sparsity (a whole number of weights)
    shapes: list[dict[str, list[int]]]  # per block: layer name -> [d_out, d_in]
    error_grid: list[float] = []  # error allocation: the sparsities each layer's error was measured at
    layer_errors: list[dict[str, list[float]]] = []  # per block: layer name -> its relative error at error_grid
    seconds: float = 0.0  # measuring on the dense model

    @property
    def achieved(self) -> float:
        """The overall sparsity of the decoder linears the layer sparsities give."""
        zeros = sum(round(self.layers[b][name] * math.prod(shape)) for b, block in enumerate(self.shapes)
                    for name, shape in block.items())
        return zeros / sum(math.prod(shape) for block in self.shapes for shape in block.values())


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float) -> float:
    """The fraction of all entries of ``scores`` (one block's layers) above ``threshold`` times their mean."""
    total = sum(score.numel() for score in scores)
    mean = sum(float(score.sum(dtype=torch.float64)) for score in scores) / total
    above = sum(int((score > threshold * mean).sum()) for score in scores)
    return above / total


def block_sparsities(ratios: Sequence[float], sizes: Sequence[int], spec: AllocationSpec, target: float) -> list[float]:
    """Per-block sparsities from the outlier ratios (module docstring): within the bounds, averaging ``target``
    over the blocks' weight counts ``sizes``."""
    low, high = min(ratios), max(ratios)
    if high > low:
        spread = [2.0 * spec.spread * (ratio - low) / (high - low) for ratio in ratios]
    else:  # every block alike: nothing to favour
        spread = [0.0 for _ in ratios]
    mean = sum(spread) / len(spread)
    raw = [target + mean - r for r in spread]
    return _clipped_to_average(raw, sizes, target, spec.min_sparsity, spec.max_sparsity)


def _clipped_to_average(values: Sequence[float], sizes: Sequence[int], target: float, low: float,
                        high: float) -> list[float]:
    """``values`` shifted by one constant c and clipped to [low, high] so that their ``sizes``-weighted mean is
    ``target`` (a bisection on c: the clipped mean grows with c)."""
    total = float(sum(sizes))

    def mean_at(shift: float) -> float:
        return sum(size * min(max(v + shift, low), high) for v, size in zip(values, sizes)) / total

    below, above = low - max(values) - 1.0, high - min(values) + 1.0
    for _ in range(200):
        middle = (below + above) / 2
        if mean_at(middle) < target:
            below = middle
        else:
            above = middle
    shift = (below + above) / 2
    return [min(max(v + shift, low), high) for v in values]


def exact_layer_sparsities(sparsities: Sequence[dict[str, float]], shapes: Sequence[dict[str, list[int]]],
                           target: float) -> list[dict[str, float]]:
    """Each layer's sparsity as a whole number of pruned weights: its sparsity in ``sparsities`` (per block,
    layer name -> sparsity), rounded so that the decoder linears hold exactly round(target x weights) zeros
    (largest remainders first, every layer keeping at least one weight)."""
    sizes = [(b, name, math.prod(shape)) for b, layers in enumerate(shapes) for name, shape in layers.items()]
    wanted = round(target * sum(size for _, _, size in sizes))
    exact = [sparsities[b][name] * size for b, name, size in sizes]
    zeros = [min(math.floor(value), size - 1) for value, (_, _, size) in zip(exact, sizes)]
    short = wanted - sum(zeros)
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - zeros[i], reverse=short > 0)
    step = 1 if short > 0 else -1
    while short:
        moved = False
        for i in order:
            if short == 0:
                break
            size = sizes[i][2]
            if 0 <= zeros[i] + step <= size - 1:
                zeros[i] += step
                short -= step
                moved = True
        if not moved:
            raise ValueError(f"no layer sparsities within [0, 1) give an overall sparsity of {target}")
    result: list[dict[str, float]] = [{} for _ in shapes]
    for (b, name, size), count in zip(sizes, zeros):
        result[b][name] = count / size
    return result


def error_sparsities(curves: Sequence[Sequence[float]], sizes: Sequence[int], grid: Sequence[float],
                     target: float, steps: int = ERROR_STEPS) -> list[float]:
    """Each unit's sparsity (in [grid[0], grid[-1]]) so that the ``sizes``-weighted mean reaches ``target``:
    starting all at grid[0], each of ``steps`` equal steps of sparsity goes to the unit whose error (its
    ``curves`` at ``grid``, interpolated linearly) rises least per weight it prunes."""
    if len(grid) == 1:
        return [grid[0]] * len(curves)
    low, high = grid[0], grid[-1]
    fine = [low + (high - low) * i / steps for i in range(steps + 1)]
    levels = []
    for curve in curves:
        rising = list(itertools.accumulate(curve, max))  # pruning more never costs less
        levels.append([curve_at(grid, rising, s) for s in fine])
    step = (high - low) / steps
    missing = (target - low) * sum(sizes)  # zeros still to hand out
    at = [0] * len(curves)
    heap = [((levels[u][1] - levels[u][0]) / sizes[u], u) for u in range(len(curves))]
    heapq.heapify(heap)
    while missing > 1e-9 * sum(sizes) and heap:
        _, u = heapq.heappop(heap)
        at[u] += 1
        missing -= sizes[u] * step
        if at[u] < steps:
            heapq.heappush(heap, ((levels[u][at[u] + 1] - levels[u][at[u]]) / sizes[u], u))
    return [fine[i] for i in at]


def curve_at(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """The piecewise-linear curve through (xs, ys) at ``x`` (xs increasing, x within them)."""
    for i in range(1, len(xs)):
        if x <= xs[i]:
            share = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + share * (ys[i] - ys[i - 1])
    return ys[-1]


def allocate_sparsity(key: str, spec: AllocationSpec, target: float,
                      measured: Sequence[BlockMeasurement]) -> Allocation:
    """The allocation of ``target`` over the blocks whose layers and measurements are ``measured``."""
    shapes = [block.shapes for block in measured]
    sizes = [{name: math.prod(shape) for name, shape in block.items()} for block in shapes]
    block_sizes = [sum(layers.values()) for layers in sizes]
    ratios: list[float] = []
    grid: list[float] = []
    if spec.method == "uniform":
        wanted = [{name: target for name in block} for block in shapes]
    elif spec.method == "owl":
        ratios = [block.outlier_ratio for block in measured]
        per_block = block_sparsities(ratios, block_sizes, spec, target)
        wanted = [{name: value for name in block} for block, value in zip(shapes, per_block)]
    else:
        grid = spec.error_grid(target)
        wanted = _error_allocation(measured, sizes, grid, spec, target)
    layers = exact_layer_sparsities(wanted, shapes, target)
    means = [sum(wanted[b][name] * size for name, size in block.items()) / block_sizes[b]
             for b, block in enumerate(sizes)]
    return Allocation(key=key, method=spec.method, target=target, outlier_ratios=ratios, block_sparsity=means,
                      layers=layers, shapes=shapes, error_grid=grid,
                      layer_errors=[block.errors for block in measured] if grid else [])


def _error_allocation(measured: Sequence[BlockMeasurement], sizes: Sequence[dict[str, int]], grid: Sequence[float],
                      spec: AllocationSpec, target: float) -> list[dict[str, float]]:
    """Per block and layer the error allocation's sparsity: the layers of the whole model as units, the layers of
    each block with the block at the target, or whole blocks (a block's curve: the sum of its layers')."""
    if spec.granularity == "layer-in-block":  # each block's layers share the target among themselves
        return [dict(zip(block, error_sparsities([measured[b].errors[name] for name in block],
                                                 list(block.values()), grid, target)))
                for b, block in enumerate(sizes)]
    if spec.granularity == "layer":
        found = iter(error_sparsities([measured[b].errors[name] for b, block in enumerate(sizes) for name in block],
                                      [size for block in sizes for size in block.values()], grid, target))
        return [{name: next(found) for name in block} for block in sizes]
    curves = [[sum(values) for values in zip(*block.errors.values())] for block in measured]
    found = error_sparsities(curves, [sum(block.values()) for block in sizes], grid, target)
    return [{name: value for name in block} for block, value in zip(sizes, found)]


@torch.inference_mode()
def measure_blocks(model: PreparedModel, calibration: FileRecord, spec: AllocationSpec, target_sparsity: float, *,
                   device: str, batch_size: int, offload: bool, parts: Path | None = None,
                   progress: Callable[[int, float, bool], None] | None = None) -> list[BlockMeasurement]:
    """Every block's linear layers and what ``spec``'s method reads of them (outlier ratio or error curves),
    from the dense model run block by block over the calibration inputs (held in memory: two boundaries at a
    time). With ``parts`` each block's measurement is kept there as it is made, so a run stopped midway
    measures again only the blocks it had not finished: the blocks before them only run forward.
    ``progress(index, seconds, reused)`` follows each block."""
    config = AutoConfig.from_pretrained(model.folder)
    target = resolve_device(device)
    inputs = load_block_inputs(calibration.path, target, offload=offload)
    grid = spec.error_grid(target_sparsity)
    result = []
    for index in range(model.num_layers):
        started = time.perf_counter()
        block = build_block(model.folder, index, torch.float32, target)
        block_inputs = inputs.for_layer_type(block_layer_type(config, index))
        part = None if parts is None else parts / f"block-{index:05d}.json"
        measured = _read_part(part)
        reused = measured is not None
        if measured is not None:
            outputs = run_block(block, block_inputs, batch_size)
        elif spec.method == "error":
            errors = _error_curves(block, block_inputs, grid, batch_size)
            outputs = run_block(block, block_inputs, batch_size)
            measured = BlockMeasurement(shapes=_shapes(block), errors=errors)
        else:
            measured, outputs = _outlier_measurement(block, block_inputs, spec, batch_size)
        if part is not None and not reused:
            atomic_write_json(part, measured.model_dump(mode="json"))
        result.append(measured)
        inputs = replace(inputs, hidden=outputs)
        if progress is not None:
            progress(index, time.perf_counter() - started, reused)
    return result


def _shapes(block: nn.Module) -> dict[str, list[int]]:
    return {name: list(m.weight.shape) for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def _read_part(path: Path | None) -> BlockMeasurement | None:
    """A block's measurement kept by an earlier, stopped run (None: none, or one that cannot be read)."""
    if path is None or not path.is_file():
        return None
    try:
        return BlockMeasurement.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None


def _outlier_measurement(block: nn.Module, inputs: BlockInputs, spec: AllocationSpec,
                         batch_size: int) -> tuple[BlockMeasurement, torch.Tensor]:
    """OWL's outlier ratio of the block (and its outputs) from one forward that also sums each input's squares."""
    squares = _InputSquares(block)
    try:
        outputs = run_block(block, inputs, batch_size)
    finally:
        squares.close()
    linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    scores = [linears[name].weight.abs() * squares.sums[name].sqrt().to(torch.float32)[None, :] for name in linears]
    return BlockMeasurement(shapes=_shapes(block), outlier_ratio=outlier_ratio(scores, spec.outlier_threshold)), outputs


def _error_curves(block: nn.Module, inputs: BlockInputs, grid: Sequence[float],
                  batch_size: int) -> dict[str, list[float]]:
    """Each linear layer's SparseGPT relative error at every sparsity of ``grid`` on ``inputs`` (the layers of a
    group share H and its factor)."""
    groups = discover_groups(block, inputs)
    errors: dict[str, list[float]] = {}
    for group in groups:  # one group's H at a time: the memory of the solve phase, not of the whole block
        problems = collect_layer_problems(block, inputs, group, batch_size=batch_size, groups=groups,
                                          input_stats=False)
        cache = GramCache()
        for name in group:
            errors[name] = [solve(problems[name], SparsityPattern.unstructured(s), "sparsegpt", cache=cache).rel_error
                            for s in grid]
    return errors


class _InputSquares:
    """Per input channel, the sum of squares of every linear layer's inputs over a forward (Wanda's ||x_j||^2)."""

    def __init__(self, block: nn.Module) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in block.named_modules()
                         if isinstance(m, nn.Linear)]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            batch = x.to(torch.float64).square().sum(dim=0)
            self.sums[name] = batch if name not in self.sums else self.sums[name] + batch

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
