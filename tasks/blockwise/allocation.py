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

The outlier ratios come from one forward pass of the dense model over the calibration inputs, block by
block (``measure_outliers``); the rest is arithmetic on them (``allocate_sparsity``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from transformers import AutoConfig

from ..config.prune import AllocationSpec
from ..model.adapters import block_layer_type, build_block
from ..model.loading import resolve_device
from ..model.prepared import PreparedModel
from .capture import load_block_inputs, run_block
from .records import FileRecord

__all__ = ["Allocation", "BlockOutliers", "allocate_sparsity", "block_sparsities", "exact_layer_sparsities",
           "measure_outliers", "outlier_ratio"]

logger = logging.getLogger(__name__)


class BlockOutliers(BaseModel):
    """One block's linear layers (name -> [d_out, d_in]) and its outlier ratio on the dense model."""

    model_config = ConfigDict(frozen=True)

    shapes: dict[str, list[int]]
    outlier_ratio: float


class Allocation(BaseModel):
    """The sparsity of every layer of every block, and what it was derived from."""

    model_config = ConfigDict(frozen=True)

    key: str  # the cache key it was computed under
    method: str
    target: float
    outlier_ratios: list[float]  # per block (OWL's D_b); empty for uniform
    block_sparsity: list[float]  # per block, before the rounding to whole weights
    layers: list[dict[str, float]]  # per block: layer name -> its sparsity (a whole number of weights)
    shapes: list[dict[str, list[int]]]  # per block: layer name -> [d_out, d_in]
    seconds: float = 0.0  # measuring the outlier ratios

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


def exact_layer_sparsities(blocks: Sequence[float], shapes: Sequence[dict[str, list[int]]],
                           target: float) -> list[dict[str, float]]:
    """Each layer's sparsity as a whole number of pruned weights: its block's sparsity, rounded so that the
    decoder linears hold exactly round(target x weights) zeros (largest remainders first, every layer keeping
    at least one weight)."""
    sizes = [(b, name, math.prod(shape)) for b, layers in enumerate(shapes) for name, shape in layers.items()]
    wanted = round(target * sum(size for _, _, size in sizes))
    exact = [blocks[b] * size for b, _, size in sizes]
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


def allocate_sparsity(key: str, spec: AllocationSpec, target: float,
                      outliers: Sequence[BlockOutliers]) -> Allocation:
    """The allocation of ``target`` over the blocks whose layers and outlier ratios are ``outliers``."""
    shapes = [block.shapes for block in outliers]
    sizes = [sum(math.prod(shape) for shape in block.values()) for block in shapes]
    if spec.method == "uniform":
        ratios: list[float] = []
        blocks = [target] * len(shapes)
    else:
        ratios = [block.outlier_ratio for block in outliers]
        blocks = block_sparsities(ratios, sizes, spec, target)
    layers = exact_layer_sparsities(blocks, shapes, target)
    return Allocation(key=key, method=spec.method, target=target, outlier_ratios=ratios, block_sparsity=blocks,
                      layers=layers, shapes=shapes)


@torch.inference_mode()
def measure_outliers(model: PreparedModel, calibration: FileRecord, spec: AllocationSpec, *, device: str,
                     batch_size: int, offload: bool,
                     progress: Callable[[int, float], None] | None = None) -> list[BlockOutliers]:
    """Every block's linear layers and outlier ratio, from the dense model run block by block over the
    calibration inputs (held in memory: two boundaries at a time, nothing written)."""
    config = AutoConfig.from_pretrained(model.folder)
    target = resolve_device(device)
    inputs = load_block_inputs(calibration.path, target, offload=offload)
    result = []
    for index in range(model.num_layers):
        started = time.perf_counter()
        block = build_block(model.folder, index, torch.float32, target)
        block_inputs = inputs.for_layer_type(block_layer_type(config, index))
        squares = _InputSquares(block)
        try:
            outputs = run_block(block, block_inputs, batch_size)
        finally:
            squares.close()
        linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
        scores = [linears[name].weight.abs() * squares.sums[name].sqrt().to(torch.float32)[None, :]
                  for name in linears]
        result.append(BlockOutliers(shapes={name: list(m.weight.shape) for name, m in linears.items()},
                                    outlier_ratio=outlier_ratio(scores, spec.outlier_threshold)))
        inputs = replace(inputs, hidden=outputs)
        if progress is not None:
            progress(index, time.perf_counter() - started)
    return result


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
