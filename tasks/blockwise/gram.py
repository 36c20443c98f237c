"""The layer problems of a block from one forward pass: Gram matrices H = X^T X collected by hooks.

The linear layers of a block are found by running it: forward pre-hooks see each layer's input, and
layers that read the very same input tensor (q/k/v, gate/up) form one group sharing one H. Each batch's
X^T X is computed in the Gram dtype and summed in float64; methods that read them also get each input
channel's mean and variance. For dense targets each batch also runs through the dense block on the dense
model's inputs, and the cross Gram K = X_p^T X_d of the two passes' layer inputs is summed beside H.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from alps_solver import LayerProblem
from alps_solver.problem import gram_matrix

from ..common.errors import AlpsError
from .capture import BlockInputs, StopForward

__all__ = ["collect_layer_problems", "discover_groups"]


class _GramCollector:
    """Accumulates H and the input mean and variance for the groups it is asked to watch.

    Without ``groups`` it learns them: a layer whose input is the very tensor the previous layer read joins
    that layer's group. With ``groups`` (from a discovery pass) only each group's first member accumulates,
    and the forward stops right after the last watched group's input (the layers after it are not needed).
    """

    def __init__(self, block: nn.Module, gram_dtype: torch.dtype, groups: Sequence[Sequence[str]] | None = None,
                 watch: Sequence[str] = (), input_stats: bool = True) -> None:
        self.linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        self.gram_dtype = gram_dtype
        self.input_stats = input_stats  # also the per-channel mean and variance (only some methods read them)
        self.order: list[str] = []  # linear names in execution order
        self.group_of: dict[str, str] = {}  # linear name -> its group's first member
        for group in groups or ():
            self.order += group
            self.group_of.update({name: group[0] for name in group})
        self.discovering = groups is None
        self.watch = {self.group_of[name] for name in watch}  # groups to accumulate
        leaders = [group[0] for group in groups or () if group[0] in self.watch]
        self.stop_after = leaders[-1] if leaders else None
        self.stats: dict[str, dict[str, Any]] = {}
        self.dense_inputs: dict[str, torch.Tensor] | None = None  # this batch's X_d per watched group (dense targets)
        self.active = True  # off while the same block runs the dense pass
        self._last_input: torch.Tensor | None = None
        self._last_group = ""
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.linears.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not self.active:
                return
            x = args[0]
            if self.discovering:
                if name in self.group_of:
                    # Its H would mix the inputs of several calls, and the forward's early stop assumes one.
                    raise AlpsError("model", name, "this linear layer runs more than once in one forward of "
                                    "its block, which layer-wise pruning does not support",
                                    "prune a model whose decoder blocks call each linear layer once")
                shared = x is self._last_input
                self.order.append(name)
                self.group_of[name] = self._last_group if shared else name
                self._last_input, self._last_group = x, self.group_of[name]
                return
            if name not in self.watch:  # another group, or a member that shares its leader's input
                return
            X = x.detach().reshape(-1, x.shape[-1])
            if name not in self.stats:
                d = X.shape[1]
                fresh = {"gram": torch.zeros(d, d, dtype=torch.float64, device=X.device), "n": 0}
                if self.input_stats:
                    fresh["mean"] = torch.zeros(d, dtype=torch.float64, device=X.device)
                    fresh["m2"] = torch.zeros_like(fresh["mean"])  # sum of squared deviations from the mean
                self.stats[name] = fresh
            s = self.stats[name]
            # Each batch's X^T X in gram_dtype (fast), summed in float64 so thousands of batches don't drift.
            s["gram"] += gram_matrix(X.to(self.gram_dtype)).to(torch.float64)
            if self.dense_inputs is not None:
                X_d = self.dense_inputs[name]  # the same tokens through the dense model
                if "cross" not in s:
                    s["cross"] = torch.zeros_like(s["gram"])
                s["cross"] += (X.to(self.gram_dtype).T @ X_d.to(self.gram_dtype)).to(torch.float64)
            if self.input_stats:
                _add_batch_moments(s, X)
            s["n"] += X.shape[0]
            if name == self.stop_after:
                raise StopForward  # every watched group has this batch

        return hook

    def end_batch(self) -> None:
        self._last_input, self._last_group = None, ""

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._last_input = None

    def groups(self) -> list[list[str]]:
        ordered: dict[str, list[str]] = {}
        for name in self.order:
            ordered.setdefault(self.group_of[name], []).append(name)
        return list(ordered.values())

    def problem(self, name: str, target_mix: float = 1.0) -> LayerProblem:
        s = self.stats[self.group_of[name]]
        weight = self.linears[name].weight.detach()
        stats = {}
        if self.input_stats:
            stats = {"input_mean": s["mean"].to(weight.device), "input_var": (s["m2"] / s["n"]).to(weight.device)}
        cross = s.get("cross")
        if cross is not None and target_mix != 1.0:
            # The target output (1 - a) X_p W^T + a X_d W^T is X_t W^T with X_t = (1 - a) X_p + a X_d, whose cross
            # Gram X_p^T X_t = (1 - a) H + a K.
            cross = (1.0 - target_mix) * s["gram"] + target_mix * cross
        return LayerProblem(weight=weight.to(torch.float32), gram=s["gram"], n_tokens=s["n"], cross=cross, **stats)


class _DenseInputs:
    """The dense model's inputs of the watched groups' layers, batch by batch: the dense block run on the dense
    model's block inputs, stopped right after the last watched group's input. Its hooks act only during its own
    pass, so the dense block may be the very block being pruned (while none of its layers is pruned yet)."""

    def __init__(self, block: nn.Module, inputs: BlockInputs, leaders: Sequence[str]) -> None:
        self.block, self.inputs = block, inputs
        self.stop_after = leaders[-1]
        self.captured: dict[str, torch.Tensor] = {}
        self.active = False
        modules = dict(block.named_modules())
        self._handles = [modules[name].register_forward_pre_hook(self._hook(name)) for name in leaders]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not self.active:
                return
            self.captured[name] = args[0].detach().reshape(-1, args[0].shape[-1])
            if name == self.stop_after:
                raise StopForward

        return hook

    def batch(self, rows: slice) -> dict[str, torch.Tensor]:
        self.captured, self.active = {}, True
        try:
            self.block(self.inputs.batch(rows), **self.inputs.kwargs)
        except StopForward:
            pass
        finally:
            self.active = False
        return self.captured

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _add_batch_moments(stats: dict[str, Any], X: torch.Tensor) -> None:
    """Fold a batch X (n, d) into the running mean and sum of squared deviations of the ``stats["n"]`` rows
    seen so far (Chan et al.'s pairwise update; the caller then counts the batch in). The batch's own
    moments are taken about its mean, in float32, and only then combined in float64: E[x^2] - mean^2 from
    float32 sums loses channels whose mean dwarfs their spread."""
    X = X if X.dtype in (torch.float32, torch.float64) else X.to(torch.float32)
    n_a, n_b = stats["n"], X.shape[0]
    batch_mean = X.mean(dim=0)
    batch_m2 = (X - batch_mean).square_().sum(dim=0).to(torch.float64)
    delta = batch_mean.to(torch.float64) - stats["mean"]
    n = n_a + n_b
    stats["mean"] += delta * (n_b / n)
    stats["m2"] += batch_m2 + delta.square() * (n_a * n_b / n)


@torch.inference_mode()
def _forward(block: nn.Module, inputs: BlockInputs, batch_size: int, collector: _GramCollector,
             dense: _DenseInputs | None = None) -> None:
    for rows, hidden in inputs.batches(batch_size):
        if dense is not None:
            collector.active = False
            collector.dense_inputs = dense.batch(rows)
            collector.active = True
        try:
            block(hidden, **inputs.kwargs)
        except StopForward:
            pass
        collector.end_batch()


def discover_groups(block: nn.Module, inputs: BlockInputs) -> list[list[str]]:
    """The block's linear layers in execution order, grouped by shared input (one sample is enough)."""
    collector = _GramCollector(block, torch.float32)
    try:
        one = replace(inputs, hidden=inputs.hidden[:1])
        _forward(block, one, 1, collector)
        return collector.groups()
    finally:
        collector.close()


def collect_layer_problems(
    block: nn.Module,
    inputs: BlockInputs,
    names: Sequence[str],
    *,
    batch_size: int = 8,
    gram_dtype: torch.dtype = torch.float32,
    groups: Sequence[Sequence[str]] | None = None,
    input_stats: bool = True,
    dense_block: nn.Module | None = None,
    target_mix: float = 1.0,
) -> dict[str, LayerProblem]:
    """One forward pass over ``inputs``: the LayerProblem (W, H, input statistics) of each named linear
    layer; layers reading the same input share one H. Keys follow ``names``. ``groups`` (from
    ``discover_groups``) saves discovering them again; ``input_stats=False`` leaves out the per-channel
    input mean and variance (only methods like dsnot read them). With ``dense_block`` (the block with its
    dense weights: ``block`` itself while none of its layers is pruned) every problem also gets its cross Gram
    with the dense model's inputs ``inputs.dense_view()``: dense targets. ``target_mix`` a (0 < a <= 1) aims each
    layer at (1 - a) x its own dense output + a x the dense model's instead (the cross Gram (1 - a) H + a K)."""
    groups = groups if groups is not None else discover_groups(block, inputs)
    leader = {name: group[0] for group in groups for name in group}
    unknown = sorted(set(names) - set(leader))
    if unknown:
        raise KeyError(f"no linear layers named {unknown} run in this block; it has {sorted(leader)}")
    collector = _GramCollector(block, gram_dtype, groups, watch=names, input_stats=input_stats)
    dense = None
    if dense_block is not None:
        watched = [group[0] for group in groups if group[0] in collector.watch]
        dense = _DenseInputs(dense_block, inputs.dense_view(), watched)
    try:
        _forward(block, inputs, batch_size, collector, dense)
    finally:
        collector.close()
        if dense is not None:
            dense.close()
    return {name: collector.problem(name, target_mix) for name in names}
