"""Calibration capture: the inputs of the first decoder block, recorded from the model's own forward.

The stem (the model with its blocks removed) runs on the calibration tokens, and stand-ins for its blocks
record every positional and keyword argument the model passes them: hidden states per sample, plus the
block keywords (position embeddings, masks, position ids) that are the same for every sample. Models that
mix layer types (Gemma 2/3: sliding and full attention, each with its own mask and rotary table) give each
type its own keywords, so the stem keeps one stand-in per type and the keywords are stored by type; every
block later reads its own type's. Hidden states, all keywords and their layout go into one safetensors file;
with dense targets, the dense model's hidden states at the same boundary go beside them (``dense``).

Activations are stored in a chosen dtype (float32, or bfloat16/float16 to halve the disk and memory) and may
stay in host memory while the block runs on a GPU (``offload``): every batch is moved to the block's device
and cast to float32 there, so the block math is float32 whatever the storage.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..model.adapters import ALL_LAYERS, build_stem, layer_kinds

__all__ = ["BlockInputs", "StopForward", "capture_block_inputs", "save_block_inputs", "load_block_inputs", "run_block"]

logger = logging.getLogger(__name__)


@dataclass
class BlockInputs:
    hidden: torch.Tensor  # (nsamples, seqlen, hidden_size), in the storage dtype, on the device or in host memory
    keywords: dict[str, dict[str, Any]]  # by layer type: block keywords shared by every sample (batch dimension 1)
    device: torch.device  # where the block runs: batches are moved here
    layer_type: str = ALL_LAYERS  # whose keywords this block reads
    # The dense model's hidden states at the same boundary, for dense targets (``SolverSpec.targets``); None where
    # they are the hidden states themselves (the calibration inputs) or not kept (layer targets).
    dense: torch.Tensor | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        return self.keywords[self.layer_type]

    @property
    def nsamples(self) -> int:
        return self.hidden.shape[0]

    def for_layer_type(self, layer_type: str) -> BlockInputs:
        if layer_type not in self.keywords:
            raise KeyError(f"the stored block inputs have keywords for layer types {sorted(self.keywords)}, "
                           f"not {layer_type!r}")
        return replace(self, layer_type=layer_type)

    def batch(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """The hidden states of ``rows`` (a slice or indices of samples) on the block's device in float32 (no
        copy when already there)."""
        return self.hidden[rows].to(self.device, torch.float32)

    def batches(self, batch_size: int) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, hidden states) per batch, in order (``batch``)."""
        for start in range(0, self.nsamples, batch_size):
            rows = slice(start, min(start + batch_size, self.nsamples))
            yield rows, self.batch(rows)

    def dense_view(self) -> BlockInputs:
        """The dense model's inputs at this boundary, as block inputs of their own (same keywords)."""
        return replace(self, hidden=self.hidden if self.dense is None else self.dense, dense=None)


class StopForward(Exception):
    """Raised from inside a forward once the inputs it was run for are captured (the blocks' by the recorders,
    the watched layers' by the Gram collector): nothing after that point needs to run."""


class _Recorder(nn.Module):
    """Stands in for a decoder block of the stem: records its call, passes the hidden states on unchanged (so
    the next stand-in sees the same ones), and the last one stops the forward."""

    def __init__(self, wrapped: nn.Module, last: bool) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.last = last
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        # Some models read attributes of their layers (e.g. attention_type) before calling them.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("wrapped"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, dict(kwargs)))
        if self.last:
            raise StopForward
        return args[0] if args else kwargs["hidden_states"]


@torch.inference_mode()
def capture_block_inputs(
    folder: Path,
    tokens: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
) -> BlockInputs:
    """Hidden states entering block 0 for every row of ``tokens`` (nsamples, seqlen), in ``dtype`` in host
    memory (they are saved right away), and the block keywords of every layer type."""
    stem, adapter = build_stem(folder, torch.float32, device)
    kinds = layer_kinds(stem.config)
    layers = adapter.layers(stem)
    recorders = [_Recorder(layers[i], last=i == len(kinds) - 1) for i in range(len(kinds))]
    for i, recorder in enumerate(recorders):
        layers[i] = recorder
    hidden: list[torch.Tensor] = []
    keywords: dict[str, dict[str, Any]] | None = None
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size].to(device)
        for recorder in recorders:
            recorder.calls.clear()
        try:
            stem(input_ids=batch, use_cache=False)
        except StopForward:
            pass
        batch_keywords = {}
        for kind, recorder in zip(kinds, recorders):
            (args, kwargs), = recorder.calls
            states = args[0] if args else kwargs.pop("hidden_states")
            if kind == kinds[0]:
                hidden.append(states.to("cpu", dtype))
            kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            batch_keywords[kind] = _shared_kwargs(kwargs, len(batch))
        if keywords is None:
            keywords = batch_keywords
    logger.info("captured block inputs: %d samples x %d tokens", tokens.shape[0], tokens.shape[1])
    return BlockInputs(hidden=torch.cat(hidden), keywords=keywords or {kind: {} for kind in kinds}, device=device)


def _shared_kwargs(kwargs: dict[str, Any], batch: int) -> dict[str, Any]:
    """Keywords with any batch dimension reduced to 1; they must not differ between samples."""

    def reduce(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.ndim and value.shape[0] == batch and batch > 1:
                if not bool((value == value[:1]).all()):
                    raise ValueError("a block keyword differs between calibration samples (padding?)")
                value = value[:1]
            return value.cpu()
        if isinstance(value, (tuple, list)):
            return type(value)(reduce(v) for v in value)
        return value

    return {k: reduce(v) for k, v in kwargs.items()}


# ----------------------------------------------------------------------------------- serialization
def _encode(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        for stored, tensor in tensors.items():  # layer types share some keywords (position ids): store them once
            if tensor is value or (tensor.data_ptr() == value.data_ptr() and tensor.shape == value.shape
                                   and tensor.dtype == value.dtype and tensor.stride() == value.stride()):
                return {"tensor": stored}
        tensors[name] = value.contiguous()
        return {"tensor": name}
    if isinstance(value, (tuple, list)):
        return {"sequence": [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(value)],
                "tuple": isinstance(value, tuple)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"block keyword {name!r} has type {type(value).__name__}, which cannot be stored; "
                    "calibration runs with use_cache=False, so caches should never appear")


def _decode(spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in spec:
        return tensors[spec["tensor"]]
    if "sequence" in spec:
        items = [_decode(s, tensors) for s in spec["sequence"]]
        return tuple(items) if spec["tuple"] else items
    return spec["value"]


def save_block_inputs(path: Path, inputs: BlockInputs, hidden: torch.Tensor | None = None,
                      dense: torch.Tensor | None = None) -> None:
    """Write hidden states (``inputs``' own, or ``hidden`` with its keywords), the dense model's (``dense``, if
    given) and every layer type's keywords to ``path`` (callers write to a temporary name, then rename)."""
    states = inputs.hidden if hidden is None else hidden
    tensors: dict[str, torch.Tensor] = {"hidden": states.detach().to("cpu").contiguous()}
    if dense is not None:
        tensors["dense"] = dense.detach().to("cpu").contiguous()
    spec = {kind: {k: _encode(v, f"kw.{kind}.{k}", tensors) for k, v in kwargs.items()}
            for kind, kwargs in inputs.keywords.items()}
    save_file(tensors, str(path), metadata={"keywords": json.dumps(spec)})


def load_block_inputs(path: Path, device: torch.device, *, offload: bool = False) -> BlockInputs:
    """The block inputs stored at ``path``: keywords on ``device``, hidden states there too, or in host
    memory with ``offload`` (batches then move to ``device`` one at a time)."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        spec = json.loads(handle.metadata()["keywords"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    hidden, dense = tensors.pop("hidden"), tensors.pop("dense", None)
    if not offload:
        hidden, dense = hidden.to(device), None if dense is None else dense.to(device)
    tensors = {name: t.to(device) for name, t in tensors.items()}
    keywords = {kind: {k: _decode(v, tensors) for k, v in kwargs.items()} for kind, kwargs in spec.items()}
    return BlockInputs(hidden=hidden, keywords=keywords, device=device, dense=dense)


@torch.inference_mode()
def run_block(block: nn.Module, inputs: BlockInputs, batch_size: int) -> torch.Tensor:
    """The block's outputs for every sample, stored like its inputs (dtype and place)."""
    outputs = torch.empty_like(inputs.hidden)
    for rows, hidden in inputs.batches(batch_size):
        out = block(hidden, **inputs.kwargs)
        outputs[rows] = out[0] if isinstance(out, tuple) else out
    return outputs
