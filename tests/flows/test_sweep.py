"""The sweep flow on a tiny LLaMA: every (method, pattern) pruned as a subflow, one calibration capture,
summary artifact, plot, and optional MLflow child runs with perplexity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alps_solver import SparsityPattern
from flows.sweep import sweep_models
from tasks.common.errors import SettingError
from tasks.config.sweep import SweepConfig
from tasks.config.validation import validated
from tasks.sweep import SweepFailed
from tasks.tracking.sweeps import PLOT_FILE, SUMMARY_FILE
from tests.flows.test_prune_flow import save_model

TINY_SETTINGS = {"calibration": {"dataset": "pydoc", "nsamples": 4, "seqlen": 32},
                 "runtime": {"device": "cpu", "batch_size": 2}}


def sweep_config(model_dir: Path, tmp_path: Path, **settings) -> SweepConfig:
    runtime = {**TINY_SETTINGS["runtime"], "cache_dir": tmp_path / "cache"}
    return SweepConfig(model=str(model_dir), output=tmp_path / "sweep", **{**TINY_SETTINGS, "runtime": runtime},
                       **settings)


def _task_runs(flow_run_ids: list[str], name: str) -> dict[str, str]:
    """flow run id -> state name of its task run called ``name`` (each subflow runs it once)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)),
                                     task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=name)))
    return {str(run.flow_run_id): run.state.name for run in runs}


def _artifact(key: str) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                          limit=1, sort="CREATED_DESC")
    data = artifacts[0].data
    return json.loads(data) if isinstance(data, str) else data


def test_sweep_shares_one_calibration_and_summarises(prefect_harness, tokenizer, tmp_path):
    model_dir = save_model(tmp_path / "model", tokenizer)
    summary = sweep_models(sweep_config(
        model_dir, tmp_path, methods=["alps", "magnitude"], patterns=["0.5", "2:4"], concurrency=2, track=True,
        evaluation={"perplexity": ["pydoc"], "tasks": [], "seqlen": 32, "max_windows": 2},
    ))
    rows = summary.configurations
    assert [(r.method, r.pattern) for r in rows] == [("alps", "0.5"), ("alps", "2:4"),
                                                     ("magnitude", "0.5"), ("magnitude", "2:4")]
    assert all(r.status == "completed" for r in rows)
    outputs = {r.output for r in rows}
    assert {p.name for p in outputs} == {"alps-0.5", "alps-2_4", "magnitude-0.5", "magnitude-2_4"}
    for row in rows:
        report = json.loads((row.output / "prune_report.json").read_text())
        solver = report["config"]["solver"]
        assert solver["method"] == row.method and solver["pattern"] == row.pattern
        assert row.mean_rel_error == pytest.approx(report["mean_rel_error"])
        assert row.sparsity == SparsityPattern.parse(row.pattern).sparsity
        assert row.perplexity["pydoc"] > 1
    errors = {(r.method, r.pattern): r.mean_rel_error for r in rows}
    assert errors[("alps", "0.5")] < errors[("magnitude", "0.5")]

    # One calibration capture: the first configuration computes it, the three others hit the cache.
    states = _task_runs([r.flow_run_id for r in rows], "capture-calibration")
    assert [states[r.flow_run_id] for r in rows] == ["Completed", "Cached", "Cached", "Cached"]
    assert not list((tmp_path / "cache" / "activations").glob("*.safetensors"))  # released at the end

    sweep = tmp_path / "sweep"
    assert (sweep / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((sweep / SUMMARY_FILE).read_text())["configurations"] == [r.model_dump(mode="json") for r in rows]
    table = _artifact("sweep-summary")
    assert [(t["method"], t["pattern"]) for t in table] == [(r.method, r.pattern) for r in rows]

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    children = [client.get_run(r.mlflow_run_id) for r in rows]
    parents = {run.data.tags["mlflow.parentRunId"] for run in children}
    assert len(parents) == 1 and client.get_run(parents.pop()).info.status == "FINISHED"
    assert all("ppl/pydoc" in run.data.metrics and "prune/mean_rel_error" in run.data.metrics for run in children)


def plan(**settings):
    return validated(SweepConfig, {"model": "m", **settings}).plan()


def test_plan_names_the_bad_field(tmp_path):
    configs = plan(methods=["wanda"], patterns=["0.5", "rows:0.7"], calibration={"nsamples": 4}, output=tmp_path)
    assert [c.output.folder.name for c in configs] == ["wanda-0.5", "wanda-rows_0.7"]
    assert all(c.runtime.keep_calibration and not c.runtime.keep_activations for c in configs)
    with pytest.raises(SettingError, match="method="):
        plan(methods=["nope"], patterns=["0.5"])
    with pytest.raises(SettingError, match="solver.method"):  # the sweep sets method and pattern per configuration
        plan(methods=["alps"], patterns=["0.5"], solver={"method": "wanda"})
    with pytest.raises(SettingError, match="nsamples"):
        plan(methods=["alps"], patterns=["0.5"], calibration={"nsamples": 0})


def test_sweep_command_prints_the_table(prefect_harness, tokenizer, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    model_dir = save_model(tmp_path / "model", tokenizer)
    arguments = ["sweep", "--model", str(model_dir), "--methods", "magnitude", "--patterns", "0.5,0.7", "--calib",
                 "pydoc", "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--output", str(tmp_path / "sweep"),
                 "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "Sweep of" in result.output and "magnitude" in result.output
    assert (tmp_path / "sweep" / "magnitude-0.7" / "prune_report.json").is_file()

    bad = CliRunner().invoke(app, [*arguments, "--methods", "obs"])
    assert bad.exit_code == 2 and "method='obs'" in " ".join(bad.output.split())


def test_a_failed_configuration_is_reported_and_fails_the_sweep(prefect_harness, tokenizer, tmp_path):
    model_dir = save_model(tmp_path / "model", tokenizer)  # d_in 64 and 128: no row splits into groups of 7
    with pytest.raises(SweepFailed, match="1 of 2 configurations failed: magnitude at 3:7"):
        sweep_models(sweep_config(model_dir, tmp_path, methods=["magnitude"], patterns=["0.5", "3:7"]))
    rows = json.loads((tmp_path / "sweep" / SUMMARY_FILE).read_text())["configurations"]
    assert [r["status"] for r in rows] == ["completed", "failed"]
    assert (Path(rows[0]["output"]) / "prune_report.json").is_file() and not Path(rows[1]["output"]).exists()
