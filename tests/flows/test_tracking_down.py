"""Pruning, evaluating and sweeping when the MLflow store is down or read-only: with tracking required the command
refuses before any work (exit 2), or, when the store fails midway, saves and verifies the model, names its record
and exits 3; with tracking optional it runs untracked and says so (exit 0). The saved record is logged later with
``alps track``, or by rerunning the command, which reuses every cached block."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import flows.cli.base as cli
from alps_solver import SparsityPattern
from flows.cli import app
from tests.flows.test_prune_flow import is_block_linear, save_model, tensors_of

runner = CliRunner()
MODEL_FILES = {"config.json", "model.safetensors", "sparsity_manifest.json", "prune_report.json"}


def prune_arguments(model_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(model_dir), "--method", "alps-simple", "--pattern", "0.5", "--calib", "pydoc",
            "--nsamples", "4", "--seqlen", "32", "--output", str(tmp_path / "out"), "--cache-dir",
            str(tmp_path / "cache"), "--device", "cpu", "--eval-seqlen", "32", "--eval-max-windows", "2", *extra]


def said(result) -> str:
    return " ".join(result.output.split())  # the console wraps long lines


def assert_saved_and_verified(output: Path, model_dir: Path) -> None:
    assert MODEL_FILES | {"evaluation.json"} <= {path.name for path in output.iterdir()}
    AutoModelForCausalLM.from_pretrained(output)  # loads as is
    before, after = tensors_of(model_dir), tensors_of(output)
    for name, tensor in after.items():
        if is_block_linear(name):
            assert SparsityPattern.parse("0.5").violations(tensor != 0) == [], name
        else:
            assert torch.equal(tensor, before[name]), name


@pytest.mark.parametrize(("store", "reason"), [("closed_port_store", "connection refused"),
                                               ("read_only_store", "the database is read-only")])
def test_required_tracking_refuses_before_any_work(prefect_harness, tokenizer, tmp_path, request, store, reason):
    uri = request.getfixturevalue(store)
    model_dir = save_model(tmp_path / "model", tokenizer)
    started = time.monotonic()
    result = runner.invoke(app, prune_arguments(model_dir, tmp_path))
    assert result.exit_code == 2, result.output
    assert time.monotonic() - started < 15  # a flow run's start-up, then one refused request
    message = said(result)
    assert uri in message and reason in message and "--tracking optional" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # nothing was done


def test_optional_tracking_prunes_untracked_and_says_so(prefect_harness, tokenizer, tmp_path, closed_port_store):
    model_dir = save_model(tmp_path / "model", tokenizer)
    result = runner.invoke(app, prune_arguments(model_dir, tmp_path, "--tracking", "optional"))
    assert result.exit_code == 0, result.output
    message = said(result)
    assert "NOT tracked" in message and "Not tracked:" in message and "MLflow run" not in message
    output = (tmp_path / "out").resolve()
    assert f"alps track {output}" in message
    assert_saved_and_verified(output, model_dir)
    evaluation = json.loads((output / "evaluation.json").read_text())
    assert evaluation["run_id"] is None and evaluation["perplexity"]["pydoc"] > 1


def test_a_store_failing_midway_saves_the_model_exits_3_and_the_record_is_logged_later(
        prefect_harness, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(cli.console, "width", 250)  # the runs table's columns must not fold
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model_dir = save_model(tmp_path / "model", tokenizer)
    arguments = prune_arguments(model_dir, tmp_path)
    with monkeypatch.context() as patch:  # the store takes the check and the run, then fails
        def refuse(self, *args, **kwargs):
            raise MlflowException("API request failed: [Errno 111] Connection refused")

        patch.setattr(MlflowClient, "log_batch", refuse)
        failed = runner.invoke(app, arguments)
    assert failed.exit_code == 3, failed.output
    output = (tmp_path / "out").resolve()
    message = said(failed)
    assert "Tracking failed:" in message and "failed during the run" in message and "connection refused" in message
    assert f"saved and verified in {output}" in message and f"alps track {output}" in message
    assert_saved_and_verified(output, model_dir)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("alps").experiment_id
    (incomplete,) = client.search_runs([experiment])
    assert incomplete.info.status == "RUNNING" and "prune/mean_rel_error" not in incomplete.data.metrics

    tracked = runner.invoke(app, ["track", str(output)])  # the saved record, logged once the store works
    assert tracked.exit_code == 0, tracked.output
    later = [run for run in client.search_runs([experiment]) if run.info.run_id != incomplete.info.run_id]
    assert [run.info.status for run in later] == ["FINISHED"]
    assert "prune/mean_rel_error" in later[0].data.metrics and "ppl/pydoc" in later[0].data.metrics

    rerun = runner.invoke(app, [*arguments, "--overwrite"])  # or the same command again
    assert rerun.exit_code == 0, rerun.output
    assert json.loads((output / "prune_report.json").read_text())["reused_blocks"] == [0, 1]
    newest = client.search_runs([experiment], order_by=["attributes.start_time DESC"])[0]
    assert newest.info.status == "FINISHED" and newest.data.metrics["prune/reused_blocks"] == 2
    listed = runner.invoke(app, ["runs"])
    assert listed.exit_code == 0 and later[0].info.run_id[:8] in listed.output


def test_eval_with_the_store_down(prefect_harness, tokenizer, tmp_path, closed_port_store):
    model_dir = save_model(tmp_path / "model", tokenizer)
    arguments = ["eval", "--model", str(model_dir), "--ppl", "pydoc", "--seqlen", "32", "--max-windows", "1",
                 "--device", "cpu", "--output", str(tmp_path / "results.json")]
    refused = runner.invoke(app, arguments)
    assert refused.exit_code == 2 and "connection refused" in said(refused) and closed_port_store in said(refused)
    assert not (tmp_path / "results.json").exists()
    untracked = runner.invoke(app, [*arguments, "--tracking", "optional"])
    assert untracked.exit_code == 0, untracked.output
    assert "perplexity pydoc" in untracked.output and "Not tracked:" in said(untracked)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["run_id"] is None and results["perplexity"]["pydoc"] > 1 and results["tracking_problem"]


def test_sweep_with_the_store_down(prefect_harness, tokenizer, tmp_path, closed_port_store):
    model_dir = save_model(tmp_path / "model", tokenizer)
    arguments = ["sweep", "--model", str(model_dir), "--methods", "magnitude", "--patterns", "0.5", "--calib",
                 "pydoc", "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--output", str(tmp_path / "sweep"),
                 "--cache-dir", str(tmp_path / "cache"), "--track"]
    refused = runner.invoke(app, arguments)
    assert refused.exit_code == 2 and "connection refused" in said(refused)
    assert not (tmp_path / "sweep").exists()
    untracked = runner.invoke(app, [*arguments, "--tracking", "optional"])
    assert untracked.exit_code == 0, untracked.output
    assert "Not tracked: magnitude at 0.5: the run is not tracked in MLflow" in said(untracked)
    (row,) = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())["configurations"]
    assert row["status"] == "completed" and row["mlflow_run_id"] is None and row["tracking_problem"]
    assert (Path(row["output"]) / "prune_report.json").is_file()
