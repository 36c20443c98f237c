"""GGUF files converted once into cached safetensors folders (the bundled model is one).

transformers dequantizes a GGUF file on load (about 20 s for the bundled model); the converted folder is
keyed by the file's sha256 under the cache root, so later runs load plain safetensors and a changed file
gets a new conversion.
"""

from __future__ import annotations

import logging
import struct
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..common.errors import ModelReferenceError
from ..common.files import atomic_directory, atomic_write_json, cache_root, sha256_file

__all__ = ["check_gguf", "conversion_destination", "converted_gguf_folder"]

logger = logging.getLogger(__name__)

_SOURCE_FILE = "alps-source.json"


def converted_gguf_folder(gguf: Path) -> Path:
    """The cached safetensors folder converted from ``gguf``; converts it once if it is not cached yet.

    The folder is keyed by the GGUF file's sha256, so a changed file gets a new conversion.
    """
    gguf = Path(gguf)
    content_hash = sha256_file(gguf)
    destination = conversion_destination(gguf, content_hash)
    if (destination / "config.json").is_file():
        return destination
    check_gguf(gguf)
    logger.info("Converting %s to a safetensors folder at %s (once; about 20 s on a CPU)", gguf, destination)
    started = time.perf_counter()
    with atomic_directory(destination) as temporary:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained while it carries its quantization config; the
        # weights are already dequantized to float32, so dropping the config loses nothing.
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(temporary)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(temporary)
        atomic_write_json(temporary / _SOURCE_FILE, {"gguf": str(gguf), "sha256": content_hash})
    logger.info("Converted %s in %.1f s", gguf.name, time.perf_counter() - started)
    return destination


def check_gguf(gguf: Path) -> None:
    """Raise ModelReferenceError unless ``gguf`` is a whole GGUF file: its header parses and every tensor it
    lists lies inside the file. A truncated download or copy fails here in a second, with the fix, instead of
    deep inside transformers' loader."""
    from gguf import GGUFReader

    size = gguf.stat().st_size
    with open(gguf, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelReferenceError("model", str(gguf), f"not a GGUF file (it starts with {magic!r}, not b'GGUF')",
                                  "give a .gguf file, a model folder, a hub id or a bundled model name")
    try:
        reader = GGUFReader(gguf)
        end = max((tensor.data_offset + tensor.n_bytes for tensor in reader.tensors), default=0)
    except (ValueError, IndexError, KeyError, struct.error, OSError) as error:
        problem = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}" if str(error) else type(error).__name__
        raise ModelReferenceError("model", str(gguf), f"the GGUF file is incomplete or damaged ({problem}; it has "
                                  f"{size:,} bytes)", _GGUF_FIX) from None
    if end > size:
        raise ModelReferenceError("model", str(gguf), f"the GGUF file is truncated: its tensors end at byte {end:,} "
                                  f"but it has {size:,}", _GGUF_FIX)


_GGUF_FIX = "download or copy it again and compare its size with the source's"


def conversion_destination(gguf: Path, content_hash: str) -> Path:
    return cache_root() / "gguf" / f"{gguf.stem}-{content_hash[:16]}"
