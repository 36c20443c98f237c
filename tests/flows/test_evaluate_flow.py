"""The evaluation flow on a tiny pruned model: MLflow run contents, the prune-flow hand-off, failure status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.evaluate import evaluate_model
from flows.prune import prune_model
from tasks.common.errors import DataError
from tasks.config.evaluate import EvaluateConfig
from tasks.tracking import runs as tracking
from tests.flows.test_prune_flow import config_for, save_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS_PER_BLOCK = 7  # q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield MlflowClient(uri)


@pytest.fixture(scope="module")
def pruned(prefect_harness, tokenizer, tmp_path_factory):
    """A 2-block tiny LLaMA pruned to 50% with ALPS, and the prune flow's config and result."""
    tmp = tmp_path_factory.mktemp("pruned")
    config = config_for(save_model(tmp / "model", tokenizer), tmp)
    return config, prune_model(config)


def evaluation(model: str, data_dir: Path, **overrides) -> EvaluateConfig:
    settings = dict(model=model, perplexity=["wikitext2"], seqlen=64, max_windows=2, tasks=["piqa"], limit=4,
                    device="cpu", data_dir=data_dir, batch_size=4)
    return EvaluateConfig(**{**settings, **overrides})


def artifact_paths(client: MlflowClient, run_id: str) -> set[str]:
    paths, folders = set(), [None]
    while folders:
        for item in client.list_artifacts(run_id, folders.pop()):
            (folders.append(item.path) if item.is_dir else paths.add(item.path))
    return paths


def latest_artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                      sort=ArtifactSort.CREATED_DESC, limit=1)
    return found[0]


def test_evaluating_a_pruned_folder_logs_one_complete_run(store, pruned, data_dir, tmp_path):
    _, result = pruned
    summary = evaluate_model(evaluation(str(result.output), data_dir))
    run = store.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["method"] == "alps" and run.data.tags["pattern"] == "0.5"
    assert run.data.params["eval.limit"] == "4" and run.data.params["prune.solver.method"] == "alps"
    assert run.data.params["prune.solver_config.schedule.rho_init"] == "0.1"
    metrics = run.data.metrics
    assert metrics["ppl/wikitext2"] == pytest.approx(summary.perplexity["wikitext2"]) and metrics["ppl/wikitext2"] > 1
    assert metrics["acc/piqa"] == summary.accuracy["piqa"] and "piqa/acc_norm" in metrics
    assert metrics["eval/seconds"] > 0 and 0 < metrics["prune/mean_rel_error"] < 1

    report = json.loads((result.output / "prune_report.json").read_text())
    errors = store.get_metric_history(summary.run_id, "layer/rel_error")
    expected = [layer["rel_error"] for block in report["blocks"] for layer in block["layers"]]
    assert [m.value for m in sorted(errors, key=lambda m: m.step)] == pytest.approx(expected)
    assert len(expected) == 2 * LAYERS_PER_BLOCK
    assert sorted(m.step for m in store.get_metric_history(summary.run_id, "block/mean_rel_error")) == [0, 1]

    paths = artifact_paths(store, summary.run_id)
    assert {"prune_report.json", "sparsity_manifest.json", "plots/layer_error.png", "plots/solver_history.png",
            "plots/layer_sparsity.png", "evaluation/lm_eval_results.json", "evaluation/ppl_wikitext2.json"} <= paths
    plot = Path(store.download_artifacts(summary.run_id, "plots/layer_error.png", str(tmp_path)))
    assert plot.read_bytes()[:8] == PNG_SIGNATURE and plot.stat().st_size > 10_000
    lm_eval = json.loads(Path(store.download_artifacts(summary.run_id, "evaluation/lm_eval_results.json",
                                                       str(tmp_path))).read_text())
    assert lm_eval["results"]["piqa"]["acc,none"] == summary.accuracy["piqa"]

    assert f"{summary.perplexity['wikitext2']:.3f}" in latest_artifact("evaluation-summary").data
    table = latest_artifact("block-errors").data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [row["block"] for row in rows] == [0, 1]
    assert summary.run_id in latest_artifact("mlflow-run").data


def test_prune_flow_hand_off_logs_pruning_and_evaluation_into_one_run(store, pruned, data_dir):
    config, result = pruned
    run_id = tracking.create_run("prune-and-evaluate", tracking.prune_tags(config.model_dump(mode="json")))
    tracking.log_prune_run(result.report.to_json(), result.output, run_id=run_id)
    summary = evaluate_model(evaluation(str(result.output), data_dir, tasks=[]), run_id=run_id)
    assert summary.run_id == run_id
    run = store.get_run(run_id)
    assert run.info.status == "RUNNING"  # the owner (the prune flow) ends it
    assert {"ppl/wikitext2", "prune/mean_rel_error", "prune/computed_blocks"} <= set(run.data.metrics)
    assert len(store.get_metric_history(run_id, "layer/rel_error")) == 2 * LAYERS_PER_BLOCK  # logged once
    tracking.end_run(run_id)
    assert store.get_run(run_id).info.status == "FINISHED"


def test_a_failing_evaluation_marks_its_run_failed_and_keeps_earlier_results(store, pruned, data_dir, tmp_path):
    _, result = pruned
    partial = tmp_path / "data"
    partial.mkdir()
    (partial / "wikitext2").symlink_to(data_dir / "wikitext2")  # no piqa/ here
    with pytest.raises(DataError, match="piqa"):
        evaluate_model(evaluation(str(result.output), partial, experiment="failing"))
    (run,) = store.search_runs([store.get_experiment_by_name("failing").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.metrics["ppl/wikitext2"] > 1 and "layer/rel_error" in run.data.metrics


def test_eval_command_prints_a_table_and_writes_json(store, pruned, data_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import flows.cli.base as cli

    monkeypatch.setattr(cli.console, "width", 200)
    _, result = pruned
    output = tmp_path / "results.json"
    ran = CliRunner().invoke(cli.app, ["eval", "--model", str(result.output), "--ppl", "wikitext2", "--tasks", "",
                                       "--seqlen", "64", "--max-windows", "1", "--device", "cpu",
                                       "--data-dir", str(data_dir), "--output", str(output)])
    assert ran.exit_code == 0, ran.output
    written = json.loads(output.read_text())
    assert f"perplexity wikitext2 | {written['perplexity']['wikitext2']:.3f}".replace(" |", "") in \
        ran.output.replace(" │", "").replace("│", "")
    assert store.get_run(written["run_id"]).data.metrics["ppl/wikitext2"] == written["perplexity"]["wikitext2"]
    bad = CliRunner().invoke(cli.app, ["eval", "--tasks", "hellaswag"])
    assert bad.exit_code == 2 and "unknown zero-shot task" in bad.output
