"""The fault suite's helpers: real ``alps`` processes on a tiny model, as a scheduler or a user would run them.

Every run here is a separate process started in its own session, with no ``PREFECT_API_URL``: the command
starts its own temporary Prefect server (``tasks.local_api``), which is part of what is tested. A run can be
paused at a chosen point (``tests.faults.driver``) so that a signal lands exactly there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.flows.test_prune_flow import tensors_of

REPO = Path(__file__).resolve().parents[2]
RUN_SECONDS = 300  # the most one tiny run may take on a loaded 2-core machine


def prune_args(model: Path, output: Path, cache: Path, *extra: str) -> list[str]:
    """``alps prune`` of the tiny model: SparseGPT at 50% on 8 windows of 64 pydoc tokens, no evaluation."""
    return ["prune", "--model", str(model), "--method", "sparsegpt", "--sparsity", "0.5", "--calib", "pydoc",
            "--nsamples", "8", "--seqlen", "64", "--device", "cpu", "--no-eval", "--output", str(output),
            "--cache-dir", str(cache), *extra]


def environment(home: Path) -> dict[str, str]:
    """The test session's offline settings, a Prefect home and MLflow store of this test's own, and no
    Prefect API: each command starts and stops its own server."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PREFECT_HOME=str(home / "prefect"),
               MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}")
    env.pop("PREFECT_API_URL", None)
    return env


@dataclass
class Run:
    """An ``alps`` process, its output files, and the pause marker it creates (``tests.faults.driver``)."""

    process: subprocess.Popen
    marker: Path
    log: Path
    session: int = field(init=False)

    def __post_init__(self) -> None:
        self.session = self.process.pid  # started with start_new_session: its pid is its session id

    def wait_for_pause(self, timeout: float = RUN_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while not self.marker.exists():
            assert self.process.poll() is None, f"the run ended before its pause point:\n{self.stderr()}"
            assert time.monotonic() < deadline, "the run did not reach its pause point"
            time.sleep(0.05)

    def resume(self) -> None:
        self.marker.with_name(self.marker.name + ".go").touch()

    def signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def wait(self, timeout: float = RUN_SECONDS) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.session, signal.SIGKILL)
            raise

    def stderr(self) -> str:
        return (self.log.with_suffix(".err")).read_text(errors="replace")

    def stdout(self) -> str:
        return (self.log.with_suffix(".out")).read_text(errors="replace")

    def processes(self) -> list[psutil.Process]:
        """Every live process of the run's session (the command and whatever it started, the server too)."""
        alive = []
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) == self.session and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                continue
        return alive

    def assert_no_process_left(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, "processes of the run outlived it: " + "; ".join(
            " ".join(process.cmdline())[:160] for process in left)


def start(args: list[str], env: dict[str, str], log: Path, pause: str = "none") -> Run:
    """``alps args`` as a new process in its own session; with ``pause``, it stops there until resumed."""
    marker = log.with_suffix(".paused")
    with open(log.with_suffix(".out"), "wb") as out, open(log.with_suffix(".err"), "wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "tests.faults.driver", pause, str(marker), "--", *args],
                                   cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
    return Run(process, marker, log)


def run(args: list[str], env: dict[str, str], log: Path) -> tuple[int, str]:
    """Run ``alps args`` to its end; its exit code and standard error (every process checked gone)."""
    started = start(args, env, log)
    code = started.wait()
    started.assert_no_process_left()
    return code, started.stderr()


def temporaries(*folders: Path) -> list[Path]:
    """Temporary files or folders (``.name.<host>-<pid>.*.tmp``) anywhere under ``folders``."""
    return [path for folder in folders if folder.exists() for path in folder.rglob(".*.tmp")]


def assert_same_tensors(folder: Path, reference: dict) -> None:
    tensors = tensors_of(folder)
    assert tensors.keys() == reference["tensors"].keys()
    for name, tensor in tensors.items():
        assert tensor.dtype == reference["tensors"][name].dtype and tensor.equal(reference["tensors"][name]), name
