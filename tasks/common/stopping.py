"""Stopping a run when asked: SIGTERM (a scheduler's time limit or preemption) and SIGINT (Ctrl-C).

Python's default for SIGTERM ends the process at once, without running ``finally`` blocks, context managers
or ``atexit`` hooks: temporary folders, child processes and an MLflow run left RUNNING would outlive it.
``stop_on_signals`` turns both signals into ``Stopped``, raised in the main thread, so the run unwinds as
from any error: the step in progress stops (at its next Python instruction: a long native call, say one
eigendecomposition, finishes first), cleanup runs, and the caller exits with 128 + the signal's number.
Its finished steps are cached, so the same command resumes. Signals that arrive while the run is already
stopping are logged and ignored, so cleanup is not cut short (SIGKILL still ends it at once).

``Stopped`` is a ``KeyboardInterrupt``, so code that handles an interrupt (Prefect marks its runs Crashed,
trackers mark theirs KILLED) handles a SIGTERM the same way.

Standard library only.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["STOP_SIGNALS", "Stopped", "exit_code", "stop_on_signals"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

logger = logging.getLogger(__name__)


class Stopped(KeyboardInterrupt):
    """The run was asked to stop by a signal (``signum``)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def exit_code(signum: int) -> int:
    """The shell's exit status for a process ended by signal ``signum`` (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signum


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """In the body, SIGTERM and SIGINT raise ``Stopped`` once; the previous handlers come back at the end.
    Outside the main thread (where Python cannot set handlers) the body runs with the handlers as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping: list[int] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        if stopping:
            logger.warning("%s received while the run is stopping: ignored until its cleanup is done (SIGKILL ends "
                           "it at once)", signal.Signals(signum).name)
            return
        stopping.append(signum)
        logger.warning("%s received: stopping the run", signal.Signals(signum).name)
        raise Stopped(signum)

    previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
