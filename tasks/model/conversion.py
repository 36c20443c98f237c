"""GGUF files converted once into cached safetensors folders (the bundled model is one).

transformers dequantizes a GGUF file on load (about 20 s for the bundled model); the converted folder is
keyed by the file's sha256 under the cache root, so later runs load plain safetensors and a changed file
gets a new conversion.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..common.files import atomic_directory, atomic_write_json, cache_root, sha256_file

__all__ = ["conversion_destination", "converted_gguf_folder"]

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


def conversion_destination(gguf: Path, content_hash: str) -> Path:
    return cache_root() / "gguf" / f"{gguf.stem}-{content_hash[:16]}"
