"""Files on disk: the cache root, content hashes and atomic writes (temporary path, then rename).

A reader never sees a half-written file or folder: everything is written under a temporary name in the
destination's own folder (same file system) and renamed into place in one step. Standard library only, so
the benchmarks' problem files can use it where nothing else of the pipeline is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "CACHE_DIR_ENV",
    "PRUNE_REPORT_FILE",
    "SPARSITY_MANIFEST_FILE",
    "atomic_write",
    "atomic_directory",
    "atomic_write_json",
    "atomic_write_text",
    "cache_root",
    "sha256_file",
    "stable_hash",
]

CACHE_DIR_ENV = "ALPS_CACHE_DIR"
# Files a pruned model folder carries beside the standard Hugging Face ones.
PRUNE_REPORT_FILE = "prune_report.json"
SPARSITY_MANIFEST_FILE = "sparsity_manifest.json"
_DEFAULT_CACHE_DIR = Path("~/.cache/alps")
_HASH_CHUNK_BYTES = 1 << 22
_FILE_MODE = 0o644
_FOLDER_MODE = 0o755


def cache_root() -> Path:
    """The folder for converted models and other cached artefacts: ``$ALPS_CACHE_DIR`` or ``~/.cache/alps``."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured).expanduser() if configured else _DEFAULT_CACHE_DIR.expanduser()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks so large weight files never sit in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def stable_hash(*parts: Any) -> str:
    """Short sha256 of JSON-serialisable parts, for cache keys and folder names."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Let ``write(temporary_path)`` create the file, then rename it to ``path``; returns ``path``.

    Parent folders are created; on any error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        write(Path(temporary))
        os.chmod(temporary, _FILE_MODE)  # mkstemp creates 0600; results are meant to be shared
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (parent folders are created); returns ``path``."""
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically; returns ``path``."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_directory(destination: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``destination``; on success it is renamed to ``destination``.

    If another process created ``destination`` first, its folder wins and ours is discarded (both hold
    the same content by construction: callers key destinations by content). On error nothing is left.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp"))
    try:
        yield temporary
        os.chmod(temporary, _FOLDER_MODE)  # mkdtemp creates 0700
        try:
            os.rename(temporary, destination)
        except OSError:
            if not destination.is_dir():
                raise
            shutil.rmtree(temporary, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
