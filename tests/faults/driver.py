"""Run ``alps`` with a pause at a chosen point, so that a test can signal it there.

``python -m tests.faults.driver POINT MARKER -- ARGS...`` runs ``alps ARGS...``; when the run reaches POINT it
creates the file MARKER and waits there until ``MARKER.go`` exists (or 300 s pass), then goes on. Points:

- ``block``: block 1's layer solves are about to start (block 0 is done and cached);
- ``save``: the pruned checkpoint is written to its temporary folder, not yet verified or moved into place.

The wait is a plain ``time.sleep`` loop in the main thread, where a signal's handler runs at once. Nothing
else changes: the run is the command's own.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

_WAIT_SECONDS = 300.0


def _pause(marker: Path) -> None:
    marker.touch()
    deadline = time.monotonic() + _WAIT_SECONDS
    while not marker.with_name(marker.name + ".go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _install(point: str, marker: Path) -> None:
    if point == "block":
        from tasks.blockwise import steps

        prune_linears = steps.prune_linears
        calls = []

        def paused(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # block 1
                _pause(marker)
            return prune_linears(*args, **kwargs)

        steps.prune_linears = paused
    elif point == "save":
        from tasks.blockwise import export

        write_like = export.write_like

        def paused(*args, **kwargs):
            written = write_like(*args, **kwargs)
            _pause(marker)
            return written

        export.write_like = paused
    elif point != "none":
        raise SystemExit(f"unknown pause point {point!r}: use block, save or none")


def main() -> None:
    point, marker, separator, *arguments = sys.argv[1:]
    if separator != "--":
        raise SystemExit("usage: python -m tests.faults.driver POINT MARKER -- ALPS-ARGUMENTS...")
    _install(point, Path(marker))
    from flows.cli import app

    app(arguments, prog_name="alps")


if __name__ == "__main__":
    main()
