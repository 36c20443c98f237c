"""Files on disk: the cache root, content hashes and atomic writes (temporary path, then rename).

A reader never sees a half-written file or folder: everything is written under a temporary name in the
destination's own folder (same file system) and renamed into place in one step. Standard library only, so
the benchmarks' problem files can use it where nothing else of the pipeline is installed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import StorageError

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
    "remove_dead_temporaries",
    "storage_error",
    "temporary_name",
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


# Why a write failed, where the error is an OSError's errno or only its text (safetensors and torch report
# a failed write as their own exception types, with the OS error in the message).
_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exhausted",
                   errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                   errno.EPERM: "permission denied"}
_STORAGE_TEXTS = {"No space left on device": errno.ENOSPC, "os error 28": errno.ENOSPC,
                  "Disk quota exceeded": errno.EDQUOT, "os error 122": errno.EDQUOT,
                  "Read-only file system": errno.EROFS, "os error 30": errno.EROFS,
                  "Permission denied": errno.EACCES, "os error 13": errno.EACCES}


def storage_error(error: BaseException, path: Path | str) -> StorageError | None:
    """``error`` as a StorageError naming ``path`` (the file or folder being written, not a temporary name),
    the free space there and the fix, when it is a write that failed for lack of space or permission; None
    for any other error."""
    code = error.errno if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS else None
    if code is None:
        code = next((value for text, value in _STORAGE_TEXTS.items() if text in str(error)), None)
    if code is None:
        return None
    path = Path(path)
    folder = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(folder).free
    if code in (errno.ENOSPC, errno.EDQUOT):
        fix = ("free space there, or point --cache-dir (the run's scratch) or --output at a larger disk (`alps plan` "
               "gives what the run needs), then run the same command again: it resumes from its cached steps")
    else:
        fix = "make the folder writable, or point --cache-dir or --output elsewhere, then run the same command again"
    return StorageError("path", str(path), f"{_STORAGE_ERRNOS[code]} ({free / 1e6:.0f} MB free on that disk)", fix)


def temporary_name(path: Path) -> str:
    """A name for ``path``'s temporary file or folder beside it: hidden, and naming the host and process that
    write it, so that a later run can tell a dead writer's leftovers from a live one's."""
    return f".{Path(path).name}.{socket.gethostname()}-{os.getpid()}."


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_dead_temporaries(folder: Path, name: str | None = None) -> list[Path]:
    """Delete the temporary files and folders in ``folder`` (only those of ``name``, if given) that a process
    of this host wrote and that died before it could remove them (a SIGKILL or a power cut); returns them.
    A live writer's, or another host's on a shared file system, are left alone."""
    folder, host, removed = Path(folder), socket.gethostname(), []
    if not folder.is_dir():
        return removed
    for item in folder.iterdir():
        stem, dot, rest = item.name[1:].partition(f".{host}-")
        if not item.name.startswith(".") or not dot or (name is not None and stem != name):
            continue
        pid = rest.split(".", 1)[0]
        if not item.name.endswith((".tmp", ".old")) or not pid.isdigit() or _is_alive(int(pid)):
            continue
        if item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
        removed.append(item)
    return removed


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Let ``write(temporary_path)`` create the file, then rename it to ``path``; returns ``path``.

    Parent folders are created; on any error the temporary file is removed and ``path`` is untouched. A write
    that fails for lack of space or permission raises ``StorageError`` naming the path.
    """
    path = Path(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=temporary_name(path), suffix=".tmp")
        os.close(descriptor)
        write(Path(temporary))
        os.chmod(temporary, _FILE_MODE)  # mkstemp creates 0600; results are meant to be shared
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if (storage := storage_error(error, path)) is not None:
            raise storage from error
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
    temporary = Path(tempfile.mkdtemp(dir=destination.parent, prefix=temporary_name(destination), suffix=".tmp"))
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
