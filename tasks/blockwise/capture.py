"""Calibration capture: the inputs of the first decoder block, recorded from the model's own forward.

The stem (the model with its blocks removed) runs on the calibration tokens, and a stand-in for block 0
records every positional and keyword argument the model passes it: hidden states per sample, plus the
block keywords (position embeddings, masks, position ids) that are the same for every sample. Both go
into one safetensors file; non-tensor keywords are kept as JSON in its metadata.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..model.adapters import build_stem

__all__ = ["BlockInputs", "StopForward", "capture_block_inputs", "save_block_inputs", "load_block_inputs", "run_block"]

logger = logging.getLogger(__name__)


@dataclass
class BlockInputs:
    hidden: torch.Tensor  # (nsamples, seqlen, hidden_size)
    kwargs: dict[str, Any]  # block keywords shared by every sample (batch dimension 1)


class StopForward(Exception):
    """Raised from inside a forward once the inputs it was run for are captured (block 0's by the recorder,
    the watched layers' by the Gram collector): nothing after that point needs to run."""


class _Recorder(nn.Module):
    def __init__(self, wrapped: nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        # Some models read attributes of their layers (e.g. attention_type) before calling them.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("wrapped"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        raise StopForward


@torch.inference_mode()
def capture_block_inputs(
    folder: Path,
    tokens: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int = 8,
) -> BlockInputs:
    """Hidden states entering block 0 for every row of ``tokens`` (nsamples, seqlen), in float32."""
    stem, adapter = build_stem(folder, torch.float32, device)
    layers = adapter.layers(stem)
    recorder = _Recorder(layers[0])
    layers[0] = recorder
    hidden: list[torch.Tensor] = []
    shared: dict[str, Any] | None = None
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size].to(device)
        recorder.calls.clear()
        try:
            stem(input_ids=batch, use_cache=False)
        except StopForward:
            pass
        (args, kwargs), = recorder.calls
        states = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        hidden.append(states.float().cpu())
        batch_kwargs = _shared_kwargs(kwargs, len(batch))
        if shared is None:
            shared = batch_kwargs
    logger.info("captured block inputs: %d samples x %d tokens", tokens.shape[0], tokens.shape[1])
    return BlockInputs(hidden=torch.cat(hidden), kwargs=shared or {})


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


def save_block_inputs(path: Path, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
    """Write hidden states and keywords to ``path`` (callers write to a temporary name, then rename)."""
    tensors: dict[str, torch.Tensor] = {"hidden": hidden.contiguous()}
    spec = {k: _encode(v, f"kw.{k}", tensors) for k, v in kwargs.items()}
    save_file(tensors, str(path), metadata={"kwargs": json.dumps(spec)})


def load_block_inputs(path: Path, device: torch.device) -> BlockInputs:
    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        spec = json.loads(handle.metadata()["kwargs"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    hidden = tensors.pop("hidden")
    return BlockInputs(hidden=hidden, kwargs={k: _decode(v, tensors) for k, v in spec.items()})


@torch.inference_mode()
def run_block(block: nn.Module, inputs: BlockInputs, batch_size: int) -> torch.Tensor:
    """The block's outputs for every sample, on the inputs' device, in the inputs' dtype."""
    outputs = torch.empty_like(inputs.hidden)
    for start in range(0, inputs.hidden.shape[0], batch_size):
        out = block(inputs.hidden[start : start + batch_size], **inputs.kwargs)
        outputs[start : start + batch_size] = out[0] if isinstance(out, tuple) else out
    return outputs
