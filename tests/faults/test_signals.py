"""SIGTERM, SIGINT and SIGKILL against real ``alps prune`` processes: what is left, what the user sees, and
whether the same command resumes to the same weights."""

from __future__ import annotations

import random
import signal
import time

import pytest
from mlflow.tracking import MlflowClient

from .processes import assert_same_tensors, environment, prune_args, run, start, temporaries


def _runs(home) -> list:
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiments = client.search_experiments()
    return client.search_runs([e.experiment_id for e in experiments], order_by=["attributes.start_time DESC"])


@pytest.mark.parametrize("point", ["block", "save"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_run_cleanly_and_the_same_command_resumes(fault_model, reference, home, signum, point):
    args = prune_args(fault_model, home / "out", home / "cache")
    env = environment(home)
    stopped = start(args, env, home / "stopped", pause=point)
    stopped.wait_for_pause()
    assert len(stopped.processes()) >= 2, "the command runs its own Prefect server beside it"
    stopped.signal(signum)
    code = stopped.wait(timeout=120)

    stderr = stopped.stderr()
    assert code == 128 + signum, stderr
    assert f"Stopped by {signal.Signals(signum).name}" in stderr and "run the same command again" in stderr
    assert "Traceback" not in stderr
    stopped.assert_no_process_left()
    assert not (home / "out").exists(), "a stopped run leaves no output folder"
    assert not temporaries(home), "a stopped run leaves no temporary files or folders"
    assert [r.info.status for r in _runs(home)] == ["KILLED"], "the tracked run says it was stopped"

    code, stderr = run(args, env, home / "resumed")
    assert code == 0, stderr
    assert_same_tensors(home / "out", reference)
    cached = "4 of 4 blocks cached" if point == "save" else "1 of 4 blocks cached"  # block 0 was done
    assert cached in stderr


def test_sigkill_at_random_points_then_the_same_command_finishes_bit_identical(fault_model, reference, home):
    """Five SIGKILLs of the command alone, anywhere in a run (server start, calibration, blocks, save): its
    server goes with it each time, and the run that is left alone ends with the uninterrupted run's weights."""
    args = prune_args(fault_model, home / "out", home / "cache")
    env = environment(home)
    chance = random.Random(19)
    for attempt in range(5):
        killed = start(args, env, home / f"killed-{attempt}")
        time.sleep(chance.uniform(0.5, reference["seconds"]))
        if killed.process.poll() is not None:  # finished before the kill: nothing to kill this time
            break
        killed.signal(signal.SIGKILL)
        killed.wait()
        killed.assert_no_process_left()
    code, stderr = run(args, env, home / "finished")
    assert code == 0, stderr
    assert_same_tensors(home / "out", reference)
    assert not temporaries(home / "cache", home / "out"), "what the killed runs were writing is cleaned up"
