"""Locks between processes that share a cache folder or an output folder (two jobs on one file system).

Both are ``flock`` locks on a small lock file: the kernel drops them when their process dies, SIGKILL
included, so a crashed run never leaves a stale lock behind for the next one to wait on. (``flock`` on NFS
is emulated with POSIX record locks by Linux, which NFS servers support; the same property holds.)

- ``entry_lock(folder, key)`` serialises the computation of one cache entry: the second run waits, and
  then finds the entry the first one wrote (the caller looks the entry up again once it holds the lock).
- ``file_lock(path, what)`` is the same wait on any lock file (a new MLflow SQLite store is created under one).
- ``claim_folder(path)`` lets one run at a time write an output folder: a second run is refused at once
  with an error naming the folder and the process holding it.

Standard library only (``fcntl``: POSIX systems).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import AlpsError
from .files import storage_error

__all__ = ["FolderInUse", "LOCKS", "claim_folder", "entry_lock", "file_lock", "lock_holder"]

LOCKS = "locks"  # where a cache folder keeps its entries' lock files
_WAIT_REPORT_SECONDS = 60.0  # how often a run waiting for another one's entry says so
_POLL_SECONDS = 0.2  # a waiting run polls, so that it can say it is waiting

logger = logging.getLogger(__name__)


class FolderInUse(AlpsError):
    """Another live run holds the folder."""


def _holder_record() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


def lock_holder(path: Path) -> str:
    """Who holds (or last held) the lock file at ``path``, as it recorded itself; '' if unknown."""
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def _try_lock(path: Path) -> int | None:
    """A descriptor of ``path`` holding its exclusive lock, or None while another process holds it.

    A lock file may be unlinked by its holder on release (``claim_folder``); a process that opened the old
    file and locked it after that would hold a lock nobody else sees, so the lock only counts when ``path``
    still names the file that was locked.
    """
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            if (storage := storage_error(error, path.parent)) is not None:
                raise storage from error
            raise
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return None
        except BaseException:
            os.close(descriptor)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            same = False
        if same:
            try:  # who holds it, for the message of a run that finds it held; the lock holds without it
                os.ftruncate(descriptor, 0)
                os.write(descriptor, _holder_record().encode())
            except OSError:
                pass
            return descriptor
        os.close(descriptor)  # unlinked between open and lock: take the new file


@contextmanager
def entry_lock(folder: Path, key: str, what: str = "cache entry",
               log: logging.Logger | logging.LoggerAdapter | None = None) -> Iterator[None]:
    """Hold the lock of cache entry ``key`` in ``folder`` (``folder/locks/<key>.lock``), waiting while another
    run holds it and saying so (on ``log``) every minute. Lock files stay (a few bytes per entry)."""
    with file_lock(Path(folder) / LOCKS / f"{key}.lock", what, log, remove=False):
        yield


@contextmanager
def file_lock(path: Path, what: str, log: logging.Logger | logging.LoggerAdapter | None = None,
              remove: bool = True) -> Iterator[None]:
    """Hold the lock file at ``path``, waiting while another process holds it and saying so (on ``log``) every
    minute; ``remove`` unlinks the file on release (while still holding it: see ``_try_lock``)."""
    log = log or logger
    path = Path(path)
    descriptor = _try_lock(path)
    if descriptor is None:
        started = time.monotonic()
        log.info("%s is being computed by another run (%s); waiting for it", what, lock_holder(path) or "unknown")
        report = started + _WAIT_REPORT_SECONDS
        while (descriptor := _try_lock(path)) is None:
            time.sleep(_POLL_SECONDS)
            if time.monotonic() >= report:
                log.info("%s: still waiting for another run after %.0f s", what, time.monotonic() - started)
                report += _WAIT_REPORT_SECONDS
        log.info("%s: the other run finished it after %.0f s", what, time.monotonic() - started)
    try:
        yield
    finally:
        if remove:
            path.unlink(missing_ok=True)
        os.close(descriptor)


@contextmanager
def claim_folder(folder: Path) -> Iterator[None]:
    """Hold ``folder`` against other runs (lock file ``.<name>.lock`` beside it) for the body; a second run is
    refused with ``FolderInUse`` instead of writing the same folder at the same time."""
    folder = Path(folder).resolve()
    path = folder.with_name(f".{folder.name}.lock")
    descriptor = _try_lock(path)
    if descriptor is None:
        holder = lock_holder(path) or "a live process"
        raise FolderInUse("output", str(folder), f"another run is writing this folder ({holder})",
                          "wait for that run to finish, or choose another --output")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it: see _try_lock
        os.close(descriptor)
