"""Reading and writing Hugging Face safetensors checkpoints tensor by tensor.

Pruning touches one decoder block at a time, so nothing here loads a whole model: tensors are read by
name from the (single or sharded) ``model.safetensors`` files of a folder, and written back one by one in
the same file layout.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ..common.errors import ModelReferenceError

__all__ = ["Checkpoint", "write_like", "SINGLE_FILE", "INDEX_FILE"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


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

    def dtypes(self, prefix: str = "") -> dict[str, torch.dtype]:
        """The stored dtype of every tensor whose name starts with ``prefix``, read from the headers only."""
        out: dict[str, torch.dtype] = {}
        for file in sorted(set(self.weight_map.values())):
            with safe_open(self.folder / file, framework="pt") as handle:
                for name in handle.keys():
                    if name.startswith(prefix):
                        out[name] = _TORCH_DTYPES[handle.get_slice(name).get_dtype()]
        return out

    def parameters(self) -> int:
        """How many parameters the checkpoint stores, from the file headers alone."""
        total = 0
        for file in self.files():
            with safe_open(file, framework="pt") as handle:
                total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
        return total

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, one at a time, in file order."""
        for file in sorted(set(self.weight_map.values())):
            with safe_open(self.folder / file, framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)


def write_like(
    original: Checkpoint,
    folder: Path,
    replacement: Callable[[str], torch.Tensor | None],
    shapes: Callable[[str, list[int]], list[int]] | None = None,
) -> list[str]:
    """Write a checkpoint with ``original``'s files, names, dtypes and shapes into ``folder``.

    ``replacement(name)`` gives a tensor to store instead of the original one (same shape, cast to the
    original dtype), or None to copy the original. ``shapes(name, shape)``, when given, is each tensor's shape in
    the new checkpoint (a smaller model's; its replacement must have it). Tensors stream to disk one at a time, so
    memory does not grow with the model. Returns the file names written.
    """
    folder = Path(folder)
    total = 0
    for file in sorted(set(original.weight_map.values())):
        with safe_open(original.folder / file, framework="pt") as handle:
            names = list(handle.keys())
            entries, offset = {}, 0
            for name in names:
                part = handle.get_slice(name)
                shape, dtype = list(part.get_shape()), part.get_dtype()
                shape = shapes(name, shape) if shapes is not None else shape
                nbytes = _DTYPE_BYTES[dtype] * math.prod(shape)
                entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            total += offset
            metadata = handle.metadata() or {"format": "pt"}
            header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
            header += b" " * (-len(header) % 8)  # data starts 8-byte aligned, as safetensors writes it
            with open(folder / file, "wb") as out:
                out.write(struct.pack("<Q", len(header)))
                out.write(header)
                for name in names:
                    tensor = replacement(name)
                    stored = handle.get_tensor(name)
                    if tensor is None:
                        tensor = stored
                    if tuple(tensor.shape) != tuple(entries[name]["shape"]):
                        raise ValueError(f"replacement for {name} has shape {tuple(tensor.shape)}, "
                                         f"expected {tuple(entries[name]['shape'])}")
                    data = tensor.detach().to("cpu", stored.dtype).contiguous().reshape(-1).view(torch.uint8)
                    out.write(data.numpy().tobytes())
    index = original.folder / INDEX_FILE
    if index.is_file() and shapes is None:
        shutil.copy2(index, folder / INDEX_FILE)
    elif index.is_file():  # the same files, a smaller total
        content = json.loads(index.read_text())
        content.setdefault("metadata", {})["total_size"] = total
        (folder / INDEX_FILE).write_text(json.dumps(content, indent=2) + "\n")
    return sorted(set(original.weight_map.values()))


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
