"""A model made ready for block-by-block pruning: a local safetensors folder with canonical tensor names.

``prepare_model`` resolves a reference (downloading a hub id once), and converts a checkpoint whose tensor
names are not transformers' own (e.g. OPT's ``decoder.*``) or whose weights are ``.bin`` files once, into a
cached folder, so blocks and the stem can be read by name. ``linear_shapes`` reads the shape of every
prunable linear layer from the checkpoint headers, without loading a tensor.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open
from transformers import AutoConfig

from ..common.files import atomic_directory, cache_root, stable_hash
from .adapters import ArchitectureAdapter, adapter_for, decoder_layer_class, linear_names
from .checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint
from .loading import load_model
from .references import ModelKind, resolve_model

__all__ = ["PreparedModel", "linear_shapes", "prepare_model"]

logger = logging.getLogger(__name__)

_HUB_FILES = ["*.json", "*.model", "*.txt", "*.tiktoken"]


class PreparedModel(BaseModel):
    """A model reference resolved to a canonical local folder, with what the pipeline needs to know of it."""

    model_config = ConfigDict(frozen=True)

    reference: str
    folder: Path
    fingerprint: str  # what every cache key of a run starts from
    model_type: str
    num_layers: int
    max_positions: int  # max_position_embeddings, 0 when the config does not say


def prepare_model(reference: str) -> PreparedModel:
    """Resolve the reference to a local safetensors folder with a fingerprint (hub: download once)."""
    resolved = resolve_model(reference)
    if resolved.kind is ModelKind.HUB:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(resolved.location, revision=resolved.revision,
                                        allow_patterns=_HUB_FILES + ["*.safetensors"]))
        if not any(folder.glob("*.safetensors")):  # older repositories: PyTorch weights, converted below
            folder = Path(snapshot_download(resolved.location, revision=resolved.revision,
                                            allow_patterns=_HUB_FILES + ["*.bin"]))
    else:
        folder = Path(resolved.location)
    config = AutoConfig.from_pretrained(folder)
    if not _is_canonical(folder, adapter_for(config)):
        folder = _canonical_copy(folder, resolved.fingerprint)
    return PreparedModel(
        reference=reference,
        folder=folder,
        fingerprint=resolved.fingerprint,
        model_type=config.model_type,
        num_layers=int(config.num_hidden_layers),
        max_positions=int(getattr(config, "max_position_embeddings", 0) or 0),
    )


def linear_shapes(model: PreparedModel) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every prunable linear layer of every block, by checkpoint tensor name, in block order."""
    config = AutoConfig.from_pretrained(model.folder)
    adapter = adapter_for(config)
    layer_class, _ = decoder_layer_class(config)
    with torch.device("meta"):
        names = linear_names(layer_class(config, layer_idx=0))
    checkpoint = Checkpoint(model.folder)
    shapes: dict[str, tuple[int, int]] = {}
    for index in range(model.num_layers):
        for name in names:
            tensor_name = f"{adapter.block_prefix(index)}{name}.weight"
            with safe_open(checkpoint.folder / checkpoint.weight_map[tensor_name], framework="pt") as handle:
                d_out, d_in = handle.get_slice(tensor_name).get_shape()
            shapes[tensor_name] = (d_out, d_in)
    return shapes


def _is_canonical(folder: Path, adapter: ArchitectureAdapter) -> bool:
    """Safetensors weights whose names are the ones transformers' own classes use (block 0 under the
    adapter's layers path), so blocks and the stem can be read by name."""
    if not ((folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file()):
        return False
    return any(name.startswith(adapter.block_prefix(0)) for name in Checkpoint(folder).names)


def _canonical_copy(folder: Path, fingerprint: str) -> Path:
    """Convert a checkpoint with other tensor names (e.g. OPT's ``decoder.*``) or ``.bin`` weights once,
    through transformers, into a cached safetensors folder; later runs reuse it."""
    destination = cache_root() / "canonical" / stable_hash(fingerprint)
    if (destination / "config.json").is_file():
        return destination
    logger.info("converting %s once into a canonical safetensors folder at %s", folder, destination)
    model, tokenizer = load_model(str(folder), dtype=AutoConfig.from_pretrained(folder).dtype or torch.float32,
                                  device="cpu")
    with atomic_directory(destination) as temporary:
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
    return destination
