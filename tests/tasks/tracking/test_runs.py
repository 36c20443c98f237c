"""MLflow tracking through an explicit run id: parameters, stepped metrics, plots, run status, ``alps runs``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import flows.cli.base as cli
from flows.cli import app
from tasks.tracking import plots
from tasks.tracking import runs as tracking

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Iterator[str]:
    """One SQLite store for the module (creating its tables takes seconds); tests filter by their own runs."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


def layer_record(block: int, position: int, name: str) -> dict:
    error = 0.01 * (block + 1) + 0.001 * position
    history = [{"iteration": i, "rho": 0.1 * 1.3 ** (i // 3), "support_change": 30 - i,
                "support_change_frac": (30 - i) / 100, "rel_error": error * (1 + 1 / i)} for i in range(3, 30, 3)]
    return {"name": name, "shape": [8, 8], "group": name, "method": "alps", "pattern": "0.5", "target_sparsity": 0.5,
            "achieved_sparsity": 0.5 + 0.01 * position, "rel_error": error, "rel_error_before_backsolve": error * 1.1,
            "iterations": 27 + block, "status": "converged", "seconds": 0.1, "solver": {"history": history}}


def pruned_folder(folder: Path, blocks: int = 2) -> Path:
    """A folder with a prune_report.json shaped like tasks.blockwise.report's (the model files are not needed)."""
    records = [{"index": b, "seconds": 1.0 + b, "memory": {}, "cached": False,
                "layers": [layer_record(b, p, name) for p, name in enumerate(LAYERS)]} for b in range(blocks)]
    errors = [layer["rel_error"] for block in records for layer in block["layers"]]
    report = {"model": {"reference": "tiny"}, "pipeline_version": 2, "reused_blocks": [], "computed_blocks": [0, 1],
              "seconds": 3.0, "mean_rel_error": sum(errors) / len(errors), "blocks": records,
              "config": {"model": "tiny", "solver": {"method": "alps", "pattern": "0.5"},
                         "calibration": {"nsamples": 4}},
              "solver_config": {"schedule": {"rho_init": 0.1}}}
    folder.mkdir(parents=True)
    (folder / "prune_report.json").write_text(json.dumps(report))
    (folder / "sparsity_manifest.json").write_text(json.dumps({"tensors": {}}))
    (folder / "config.json").write_text("{}")
    return folder


def test_flatten_params_dots_nested_keys_and_keeps_lists_as_json():
    flat = tracking.flatten_params({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": None, "f": {}})
    assert flat == {"a.b.c": "1", "a.d": "[1, 2]", "e": "None", "f": "{}"}


@pytest.mark.parametrize("plot", [plots.plot_layer_errors, plots.plot_layer_sparsity, plots.plot_solver_history])
def test_plots_are_png_files_with_content(tmp_path, plot):
    report = json.loads((pruned_folder(tmp_path / "out") / "prune_report.json").read_text())
    figure = plot(report)
    path = tmp_path / "plot.png"
    figure.savefig(path)
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    assert figure.axes[0].lines or figure.axes[0].patches  # something was drawn


def test_log_prune_run_records_params_stepped_metrics_plots_and_the_model(store, tmp_path):
    folder = pruned_folder(tmp_path / "out")
    report = json.loads((folder / "prune_report.json").read_text())
    report["config"]["solver"]["method_config"] = {"max_iter": 30}
    with tracking.tracked_run(None, "prune-tiny") as run_id:
        tracking.log_prune_run(report, folder, run_id=run_id, log_model=True)
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    database = Path(store.removeprefix("sqlite:///"))
    assert run.info.artifact_uri.startswith((database.parent / "mlruns").as_uri())  # beside the store
    assert run.data.params["prune.solver.method_config.max_iter"] == "30"
    assert run.data.params["prune.solver_config.schedule.rho_init"] == "0.1"
    assert run.data.tags["method"] == "alps" and run.data.tags["model_path"] == str(folder.resolve())
    errors = client.get_metric_history(run_id, "layer/rel_error")
    assert sorted(m.step for m in errors) == list(range(6))
    assert {m.step: m.value for m in errors}[4] == pytest.approx(0.021)  # block 1, second layer
    blocks = {m.step: m.value for m in client.get_metric_history(run_id, "block/mean_rel_error")}
    assert blocks == pytest.approx({0: 0.011, 1: 0.021})
    assert run.data.metrics["prune/mean_rel_error"] == pytest.approx(0.016)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    artifacts |= {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"prune_report.json", "model", "plots/layer_error.png", "plots/solver_history.png",
            "plots/layer_sparsity.png"} <= artifacts
    local = Path(client.download_artifacts(run_id, "plots/solver_history.png", str(tmp_path)))
    assert local.read_bytes()[:8] == PNG_SIGNATURE
    assert {a.path for a in client.list_artifacts(run_id, "model")} >= {"model/config.json"}


def test_a_failing_body_marks_the_run_failed_and_keeps_what_was_logged(store):
    with pytest.raises(RuntimeError, match="boom"), tracking.tracked_run(None, "fails") as run_id:
        tracking.log_metrics(run_id, {"ppl/wikitext2": 12.5})
        raise RuntimeError("boom")
    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.metrics["ppl/wikitext2"] == 12.5


def test_a_run_passed_in_is_left_to_its_owner(store):
    owner = tracking.create_run("owner")
    with tracking.tracked_run(owner, "ignored", {"stage": "eval"}) as run_id:
        assert run_id == owner
    run = MlflowClient(store).get_run(owner)
    assert run.info.status == "RUNNING" and run.data.tags["stage"] == "eval"


def test_runs_command_lists_and_filters_runs(store, tmp_path, monkeypatch):
    monkeypatch.setattr(cli.console, "width", 250)  # the table's columns must not fold
    folder = pruned_folder(tmp_path / "out")
    report = json.loads((folder / "prune_report.json").read_text())
    report["config"] = {"model": "listed", "solver": {"method": "wanda", "pattern": "2:4"}}
    with tracking.tracked_run(None, "prune-listed") as run_id:
        tracking.log_prune_run(report, folder, run_id=run_id)
    tracking.log_metrics(run_id, {"ppl/wikitext2": 21.25, "acc/piqa": 0.625})
    runner = CliRunner()
    listed = runner.invoke(app, ["runs", "--model", "listed"])
    assert listed.exit_code == 0, listed.output
    assert run_id[:8] in listed.output and "wanda" in listed.output and "2:4" in listed.output
    assert "21.250" in listed.output and "0.6250" in listed.output
    other = runner.invoke(app, ["runs", "--model", "listed", "--method", "alps"])
    assert other.exit_code == 0 and run_id[:8] not in other.output


def test_eval_help_names_its_options():
    result = CliRunner().invoke(app, ["eval", "--help"])
    assert result.exit_code == 0
    for option in ("--ppl", "--tasks", "--limit", "--output", "--log-model", "--max-windows"):
        assert option in result.output
