"""Reading and writing Hugging Face safetensors checkpoints tensor by tensor.

Pruning touches one decoder block at a time, so nothing here loads a whole model: tensors are read by
name from the (single or sharded) ``model.safetensors`` files of a folder, and written back in shards.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ModelReferenceError

__all__ = ["Checkpoint", "write_sharded", "SINGLE_FILE", "INDEX_FILE"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3


class Checkpoint:
    """The tensors of a safetensors model folder, by name, read lazily."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SINGLE_FILE).is_file():
            with safe_open(self.folder / SINGLE_FILE, framework="pt") as handle:
                weight_map = {name: SINGLE_FILE for name in handle.keys()}
        else:
            raise ModelReferenceError(
                "model", str(self.folder), f"the folder has neither {SINGLE_FILE} nor {INDEX_FILE}",
                "point at a Hugging Face folder saved with save_pretrained(safe_serialization=True)",
            )
        self.weight_map = weight_map

    @property
    def names(self) -> list[str]:
        return list(self.weight_map)

    def files(self) -> list[Path]:
        return sorted({self.folder / f for f in self.weight_map.values()})

    def tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors (CPU, stored dtype), opening each shard once."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.folder}")
            by_file.setdefault(self.weight_map[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, wanted in by_file.items():
            with safe_open(self.folder / file, framework="pt") as handle:
                for name in wanted:
                    out[name] = handle.get_tensor(name)
        return out

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors whose name starts with ``prefix``, with the prefix removed."""
        names = [n for n in self.weight_map if n.startswith(prefix)]
        return {n[len(prefix):]: t for n, t in self.tensors(names).items()}

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, one at a time, in file order."""
        for file in sorted(set(self.weight_map.values())):
            with safe_open(self.folder / file, framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)


def write_sharded(
    tensors: Iterator[tuple[str, torch.Tensor]],
    folder: Path,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[str]:
    """Write ``(name, tensor)`` pairs as safetensors shards the way ``save_pretrained`` names them.

    One shard is written as ``model.safetensors``; more get ``model-0000i-of-0000n.safetensors`` and an
    index. Only one shard's tensors are held in memory at a time. Returns the file names written.
    """
    folder = Path(folder)
    current: dict[str, torch.Tensor] = {}
    written: list[Path] = []
    size = 0
    metadata = {"format": "pt"}

    def flush(shard: dict[str, torch.Tensor]) -> None:
        path = folder / f"shard-{len(written):05d}.tmp.safetensors"
        save_file({n: t.contiguous() for n, t in shard.items()}, str(path), metadata=metadata)
        written.append(path)

    weight_map: dict[str, int] = {}
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush(current)
            current, size = {}, 0
        current[name] = tensor
        weight_map[name] = len(written)
        size += nbytes
    flush(current)

    if len(written) == 1:
        final = [folder / SINGLE_FILE]
    else:
        total = len(written)
        final = [folder / f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    for temporary, path in zip(written, final):
        temporary.rename(path)
    if len(final) > 1:
        total_size = sum(p.stat().st_size for p in final)
        index = {
            "metadata": {"total_size": total_size},
            "weight_map": {name: final[i].name for name, i in sorted(weight_map.items())},
        }
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [p.name for p in final]
