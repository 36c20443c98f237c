"""The Prefect API a command's flows report to: the user's server, or a temporary one that dies with its run.

With ``PREFECT_API_URL`` set (a server the user runs, e.g. ``prefect server start``), flows report there and
nothing is started. Otherwise Prefect would start a temporary local server itself, as a child process that
an ``atexit`` hook stops: a run ended by SIGKILL (or by SIGTERM outside a flow) never runs that hook, and
leaves the server running with its port. ``local_api()`` starts that server itself instead, as
``python -m tasks.local_api --parent PID --port N``, a process that stops when its parent dies, however it
dies: it asks Linux to send it SIGTERM then (``PR_SET_PDEATHSIG``), and also watches its parent's pid every
second, for systems without that signal and for the case where the parent died before it was asked.

The server is the one Prefect starts (uvicorn serving ``prefect.server.api.server:create_app`` on 127.0.0.1
with the UI off), on the same SQLite database under ``PREFECT_HOME``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["local_api"]

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_WATCH_SECONDS = 1.0  # how often the server checks that its parent is alive
_STOP_SECONDS = 10.0  # how long a server may take to stop before it is killed
_START_TRIES = 3  # a port found free can be taken before the server binds it
# What Prefect's own temporary server runs with (prefect.server.api.server.SubprocessASGIServer).
_SERVER_ENVIRONMENT = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


@contextmanager
def local_api() -> Iterator[str]:
    """Yield the API URL flows report to in the body: ``PREFECT_API_URL`` if set, else a temporary server's,
    started here and stopped at the end (and with this process, if it dies first)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    server, url = _start(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url  # for processes this run starts (Dask or Ray workers)
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        _drain_prefect_workers()
        _stop(server)


def _drain_prefect_workers() -> None:
    """Let Prefect send the logs and events it still holds while the server is there to take them; without
    this, after a run stopped by a signal, its workers retry against the stopped server for a minute at exit."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=_STOP_SECONDS)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(timeout: float) -> tuple[subprocess.Popen, str]:
    import httpx
    from prefect.settings import get_current_settings

    environment = {**os.environ, **_SERVER_ENVIRONMENT,
                   **get_current_settings().to_environment_variables(exclude_unset=True)}
    environment.pop("PREFECT_API_URL", None)
    for _ in range(_START_TRIES):
        port = _free_port()
        url = f"http://127.0.0.1:{port}/api"
        server = subprocess.Popen([sys.executable, "-m", "tasks.local_api", "--parent", str(os.getpid()),
                                   "--port", str(port)], env=environment)
        logger.info("started a temporary Prefect server on %s (pid %d); it stops with this run", url, server.pid)
        deadline = time.monotonic() + timeout
        with httpx.Client() as client:
            while time.monotonic() < deadline and server.poll() is None:
                try:
                    if client.get(f"{url}/health", timeout=2.0).status_code == 200:
                        return server, url
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        if server.poll() is None:
            _stop(server)
            raise RuntimeError(f"the temporary Prefect server did not answer on {url} within {timeout:.0f} s; "
                               "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or run `prefect server "
                               "start` and set PREFECT_API_URL")
    raise RuntimeError(f"the temporary Prefect server exited at start {_START_TRIES} times (last exit code "
                       f"{server.returncode})")


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    logger.debug("temporary Prefect server (pid %d) stopped", server.pid)


# ------------------------------------------------------------------------------------------ the server process
def _die_with(parent: int) -> None:
    """Arrange for SIGTERM when ``parent`` dies: the kernel's parent-death signal where there is one, and a
    thread that checks every second whether this process was handed to another parent."""
    library = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and library:
        ctypes.CDLL(library, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_WATCH_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(_STOP_SECONDS)
        os._exit(1)  # uvicorn did not stop on SIGTERM

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--parent", type=int, required=True, help="pid whose death stops this server")
    arguments.add_argument("--port", type=int, required=True)
    options = arguments.parse_args(argv)
    _die_with(options.parent)
    import uvicorn

    uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=options.port,
                log_level="error", lifespan="on")


if __name__ == "__main__":
    main()
