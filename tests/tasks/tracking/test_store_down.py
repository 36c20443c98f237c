"""A tracking store that is down or read-only: refused within seconds when tracking is required, one warning and
no tracking when optional, a failure midway that stops only the logging, KILLED runs, and ``alps track``."""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import time
from collections.abc import Iterator

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect.exceptions import TerminationSignal
from typer.testing import CliRunner

import flows.cli.base as cli
from flows.cli import app
from tasks.common.errors import TrackingError
from tasks.tracking import runs as tracking
from tests.tasks.tracking.test_runs import pruned_folder

REFUSED = "API request failed with exception HTTPConnectionPool: [Errno 111] Connection refused"
runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Iterator[str]:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


def test_a_closed_port_is_refused_within_seconds_naming_the_uri_and_the_fix(closed_port_store):
    started = time.monotonic()
    with pytest.raises(TrackingError) as refused:
        tracking.check_store("alps", "required")
    assert time.monotonic() - started < 5
    message = str(refused.value)
    assert closed_port_store in message and "connection refused" in message
    assert "start the MLflow server" in message and "--tracking optional" in message


def test_a_read_only_store_is_refused(read_only_store):
    with pytest.raises(TrackingError, match="the database is read-only") as refused:
        tracking.check_store("alps", "required")
    assert "writable" in str(refused.value) and "--tracking optional" in str(refused.value)


@pytest.mark.usefixtures("closed_port_store")
def test_optional_tracking_warns_once_and_every_call_is_skipped(caplog):
    tracking.check_store("alps", "optional")  # nothing to check: the run's opening warns
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=tracking.__name__), \
            tracking.tracked_run(None, "untracked", mode="optional") as run_id:
        assert run_id is None
        tracking.log_metrics(run_id, {"ppl/wikitext2": 1.0})
        tracking.log_params(run_id, {"a": 1})
        assert tracking.run_url(run_id) is None
    assert time.monotonic() - started < 5
    (warning,) = [record.getMessage() for record in caplog.records]
    assert "connection refused" in warning and "NOT tracked" in warning and "alps track" in warning
    assert "not tracked in MLflow" in tracking.tracking_problem(run_id)


@pytest.mark.usefixtures("read_only_store")
def test_optional_tracking_on_a_read_only_store_goes_on_untracked():
    with tracking.tracked_run(None, "untracked", mode="optional") as run_id:
        assert run_id is None


def test_a_store_failing_midway_stops_only_the_logging(store, tmp_path, monkeypatch, caplog):
    calls = []

    def refuse(self, *args, **kwargs):
        calls.append(args)
        raise MlflowException(REFUSED)

    folder = pruned_folder(tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger=tracking.__name__), \
            tracking.tracked_run(None, "midway") as run_id:
        tracking.log_metrics(run_id, {"ppl/wikitext2": 12.5})
        monkeypatch.setattr(MlflowClient, "log_batch", refuse)
        report = json.loads((folder / "prune_report.json").read_text())
        tracking.log_prune_run(report, folder, run_id=run_id)  # does not raise
        tracking.log_metrics(run_id, {"ppl/c4": 3.0})  # skipped: the store already failed once
    assert len(calls) == 1
    (warning,) = [record.getMessage() for record in caplog.records]
    assert run_id in warning and "connection refused" in warning
    problem = tracking.tracking_problem(run_id)
    assert "failed during the run (log params: connection refused)" in problem and f"run {run_id}" in problem
    assert f"saved and verified in {folder.resolve()}" in problem and f"alps track {folder.resolve()}" in problem
    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "RUNNING"  # nothing reached the store after the failure, not even the end
    assert run.data.metrics == {"ppl/wikitext2": 12.5}


class Terminated(KeyboardInterrupt):
    """As a SIGTERM turned into an interruption (tasks.common.stopping.Stopped)."""


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, Terminated, TerminationSignal])
def test_an_interrupted_run_is_marked_killed_keeping_what_was_logged(store, interruption):
    with pytest.raises(interruption), tracking.tracked_run(None, "killed") as run_id:
        tracking.log_metrics(run_id, {"ppl/wikitext2": 12.5})
        raise interruption(signal.SIGTERM) if interruption is TerminationSignal else interruption
    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "KILLED" and run.data.metrics["ppl/wikitext2"] == 12.5


@pytest.mark.parametrize("marking_error", [MlflowException(REFUSED), RuntimeError("a bug in the store client")])
def test_marking_a_run_that_cannot_be_marked_keeps_the_original_exception(store, monkeypatch, marking_error):
    def fail(self, *args, **kwargs):
        raise marking_error

    with pytest.raises(Terminated), tracking.tracked_run(None, "killed") as run_id:
        monkeypatch.setattr(MlflowClient, "set_terminated", fail)
        raise Terminated
    assert MlflowClient(store).get_run(run_id).info.status == "RUNNING"


def test_track_logs_a_saved_folder_and_runs_lists_it(store, tmp_path, monkeypatch):
    monkeypatch.setattr(cli.console, "width", 250)
    folder = pruned_folder(tmp_path / "out")
    report = json.loads((folder / "prune_report.json").read_text())
    report["config"]["model"] = "tracked-later"
    (folder / "prune_report.json").write_text(json.dumps(report))
    (folder / "evaluation.json").write_text(json.dumps({"run_id": None, "model": str(folder), "limit": None,
                                                        "perplexity": {"pydoc": 31.5}, "accuracy": {}, "seconds": 2}))
    tracked = runner.invoke(app, ["track", str(folder)])
    assert tracked.exit_code == 0, tracked.output
    (found,) = tracking.list_runs(model="tracked-later")
    assert found["run_id"][:8] in tracked.output and found["status"] == "FINISHED"
    assert found["metrics"]["ppl/pydoc"] == 31.5 and found["metrics"]["prune/mean_rel_error"] > 0
    run = MlflowClient(store).get_run(found["run_id"])
    assert run.data.tags["alps.logged_by"] == "alps track" and run.data.tags["model_path"] == str(folder.resolve())
    assert len(MlflowClient(store).get_metric_history(found["run_id"], "layer/rel_error")) == 6
    listed = runner.invoke(app, ["runs", "--model", "tracked-later"])
    assert listed.exit_code == 0 and found["run_id"][:8] in listed.output and "31.500" in listed.output


def test_track_needs_a_prune_report_and_a_store(tmp_path, closed_port_store):
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = runner.invoke(app, ["track", str(empty)])
    assert missing.exit_code == 2 and "holds no prune_report.json" in missing.output
    down = runner.invoke(app, ["track", str(pruned_folder(tmp_path / "out"))])
    assert down.exit_code == 2 and "connection refused" in down.output and closed_port_store in down.output


def test_a_new_sqlite_store_is_created_whole_and_found_by_the_next_run(tmp_path, monkeypatch):
    database = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    tracking.check_store("alps", "required")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"], "no temporary database or lock file left"
    with sqlite3.connect(database) as connection:
        tables = {row[0] for row in connection.execute("select name from sqlite_master where type = 'table'")}
    assert {"runs", "experiments", "metrics"} <= tables
    with tracking.tracked_run(None, "second") as run_id:  # the store made whole is used as it is
        tracking.log_metrics(run_id, {"ppl/wikitext2": 1.0})
    assert MlflowClient(f"sqlite:///{database}").get_run(run_id).info.status == "FINISHED"


def test_a_half_made_sqlite_store_is_refused_with_what_happened_and_the_fix(tmp_path, monkeypatch):
    database = tmp_path / "mlflow.db"
    with sqlite3.connect(database) as connection:  # as a process killed while MLflow made its tables in place
        connection.execute("create table model_version_tags (key text)")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    with pytest.raises(TrackingError) as refused:
        tracking.check_store("alps", "required")
    assert "half-made" in str(refused.value) and "delete the file" in str(refused.value)
