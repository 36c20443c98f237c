"""MLflow tracking: the one module that talks to MLflow, always through ``MlflowClient`` and an explicit run id.

MLflow's active run is thread-local (inside Prefect tasks run in a thread pool ``mlflow.active_run()`` is
None), so nothing here uses ``mlflow.start_run``: a run is created once per flow run and its id is passed on.

Store: ``$MLFLOW_TRACKING_URI`` when set (any MLflow URI), else a SQLite file and an artifact folder in
the working directory (``sqlite:///<cwd>/mlflow.db``, artifacts under ``<cwd>/mlruns``). A new experiment
in a SQLite store keeps its artifacts in ``mlruns/`` beside the database file.

What a run holds:

- parameters: the run's config flattened to dotted keys (``prune.solver.method``, ``prune.calibration.nsamples``,
  ``prune.solver_config.schedule.rho_init`` for the method's full config, ``eval.limit``);
- metrics with steps: ``layer/rel_error``, ``layer/rel_error_before_backsolve``, ``layer/sparsity``,
  ``layer/iterations`` (step = global layer index, blocks in order) and ``block/mean_rel_error``,
  ``block/seconds`` (step = block index);
- final metrics: ``prune/mean_rel_error``, ``prune/seconds``, ``ppl/<dataset>``, ``acc/<task>``,
  ``<task>/<metric>`` (every lm-eval metric), ``eval/seconds``, ``eval/zero_shot_seconds``;
- artifacts: ``prune_report.json``, ``sparsity_manifest.json``, ``plots/layer_error.png``,
  ``plots/solver_history.png``, ``plots/layer_sparsity.png``, ``evaluation/lm_eval_results.json``,
  ``evaluation/ppl_<dataset>.json``, and the pruned model folder under ``model/`` (``log_model=True``) or only
  its path as the tag ``model_path``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..common.files import PRUNE_REPORT_FILE, SPARSITY_MANIFEST_FILE
from ..config.defaults import DEFAULT_EXPERIMENT
from .plots import layer_rows, plot_layer_errors, plot_layer_sparsity, plot_solver_history

__all__ = [
    "DEFAULT_EXPERIMENT",
    "create_run",
    "end_run",
    "evaluation_tags",
    "flatten_params",
    "list_runs",
    "log_evaluation",
    "log_metrics",
    "log_params",
    "log_perplexity",
    "log_prune_report",
    "log_prune_run",
    "prune_params",
    "prune_run_name",
    "prune_tags",
    "run_url",
    "tracked_run",
    "tracking_uri",
]

UI_URL_ENV = "ALPS_MLFLOW_UI_URL"
DEFAULT_UI_URL = "http://127.0.0.1:5000"
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch call


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri())


def _experiment_id(client: Any, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=_artifact_location(tracking_uri()))


def _artifact_location(uri: str) -> str | None:
    """``mlruns/`` beside a SQLite store's file (MLflow's own default is ``./mlruns`` in whatever the working
    directory is); other stores keep their server's default."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    return (database.parent.resolve() / "mlruns").as_uri()


def create_run(run_name: str, tags: Mapping[str, str] | None = None, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Create a run (status RUNNING) and return its id."""
    client = _client()
    run = client.create_run(_experiment_id(client, experiment), run_name=run_name, tags=dict(tags or {}))
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """Mark a run FINISHED or FAILED; what was logged stays."""
    _client().set_terminated(run_id, status=status)


@contextmanager
def tracked_run(
    run_id: str | None, run_name: str, tags: Mapping[str, str] | None = None, experiment: str = DEFAULT_EXPERIMENT
) -> Iterator[str]:
    """Yield ``run_id``, or a new run's id. A run created here ends FINISHED, or FAILED if the body raises;
    a run passed in belongs to its caller, who ends it (tags are still added)."""
    owned = run_id is None
    if owned:
        run_id = create_run(run_name, tags, experiment)
    else:
        for key, value in (tags or {}).items():
            _client().set_tag(run_id, key, value)
    try:
        yield run_id
    except BaseException:
        if owned:
            end_run(run_id, "FAILED")
        raise
    if owned:
        end_run(run_id, "FINISHED")


def run_url(run_id: str) -> str:
    """Where the run shows in ``mlflow ui`` (``$ALPS_MLFLOW_UI_URL``, default http://127.0.0.1:5000)."""
    run = _client().get_run(run_id)
    base = os.environ.get(UI_URL_ENV, DEFAULT_UI_URL).rstrip("/")
    return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts flattened to dotted keys; values as strings (lists as JSON), cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
            continue
        text = json.dumps(value, default=str) if isinstance(value, (list, tuple, Mapping)) else str(value)
        flat[name] = text[:_MAX_PARAM_CHARS]
    return flat


def log_params(run_id: str, config: Mapping[str, Any], prefix: str = "") -> None:
    from mlflow.entities import Param

    params = [Param(key, value) for key, value in flatten_params(config, prefix).items()]
    client = _client()
    for first in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=params[first : first + 100])


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Log finite metrics at one step (non-finite values, e.g. a diverged perplexity, are skipped)."""
    _log_metric_rows(run_id, [(name, value, step) for name, value in metrics.items()])


def _log_metric_rows(run_id: str, rows: list[tuple[str, float, int]]) -> None:
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    metrics = [Metric(name, float(value), stamp, step) for name, value, step in rows if math.isfinite(float(value))]
    client = _client()
    for first in range(0, len(metrics), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[first : first + _METRICS_PER_BATCH])


# ------------------------------------------------------------------------------------------ pruning
def log_prune_report(run_id: str, report: Mapping[str, Any]) -> None:
    """Per-layer and per-block metrics with steps, final pruning metrics, the report and its plots."""
    rows: list[tuple[str, float, int]] = []
    for layer in layer_rows(report):
        step = layer["index"]
        rows += [("layer/rel_error", layer["rel_error"], step), ("layer/sparsity", layer["achieved_sparsity"], step),
                 ("layer/iterations", layer["iterations"], step)]
        if layer.get("rel_error_before_backsolve") is not None:
            rows.append(("layer/rel_error_before_backsolve", layer["rel_error_before_backsolve"], step))
    for block in report["blocks"]:
        errors = [layer["rel_error"] for layer in block["layers"]]
        rows += [("block/mean_rel_error", sum(errors) / max(len(errors), 1), block["index"]),
                 ("block/seconds", block["seconds"], block["index"])]
    rows += [("prune/mean_rel_error", report["mean_rel_error"], 0), ("prune/seconds", report["seconds"], 0)]
    _log_metric_rows(run_id, rows)
    client = _client()
    client.log_dict(run_id, dict(report), PRUNE_REPORT_FILE)
    for name, plot in (("layer_error", plot_layer_errors), ("solver_history", plot_solver_history),
                       ("layer_sparsity", plot_layer_sparsity)):
        figure = plot(report)
        try:
            client.log_figure(run_id, figure, f"plots/{name}.png")
        finally:
            figure.clear()


def log_prune_run(
    report: Mapping[str, Any],
    output: str | Path,
    *,
    run_id: str | None = None,
    log_model: bool = False,
    experiment: str = DEFAULT_EXPERIMENT,
) -> str:
    """Log a finished pruning run from its report (``PruneReport.to_json()``); returns the run id (a new FINISHED
    run unless ``run_id`` is given). ``output`` is the pruned folder: with ``log_model`` it is copied into the
    run's artifacts (``model/``); otherwise only its path is recorded (tag ``model_path``) beside its
    sparsity manifest.
    """
    output = Path(output).resolve()
    config = report["config"]
    with tracked_run(run_id, prune_run_name(config), prune_tags(config, output), experiment) as run:
        log_params(run, prune_params(report), "prune.")
        log_metrics(run, {"prune/reused_blocks": len(report["reused_blocks"]),
                          "prune/computed_blocks": len(report["computed_blocks"]),
                          "prune/flow_seconds": float(report["seconds"])})
        log_prune_report(run, report)
        log_model_folder(run, output, log_model)
    return run


def prune_params(report: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters a prune report records: its config, and the method's full config as ``solver_config``."""
    solver_config = report.get("solver_config")
    return {**report["config"], **({"solver_config": solver_config} if solver_config is not None else {})}


def _solver_settings(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Where a config dict keeps method and pattern: under ``solver`` (pipeline version 2 and later), or at
    its top (reports written by version 1)."""
    solver = config.get("solver")
    return solver if isinstance(solver, Mapping) else config


def prune_tags(config: Mapping[str, Any], output: Path | None = None) -> dict[str, str]:
    """Tags ``alps runs`` filters and shows on: model, method, pattern (and model_path)."""
    solver = _solver_settings(config)
    tags = {"model": str(config.get("model", "")), "method": str(solver.get("method", "")),
            "pattern": str(solver.get("pattern", ""))}
    if output is not None:
        tags["model_path"] = str(output)
    return tags


def evaluation_tags(model: str, report: Mapping[str, Any] | None) -> dict[str, str]:
    """Tags of an evaluation run: a pruned folder's are those of its pruning (base model, method, pattern)
    plus ``model_path``; a model without a prune report is ``dense``."""
    if report is None:
        return {"model": model, "method": "dense", "pattern": "dense"}
    return {**prune_tags(report["config"]), "model_path": str(Path(model).resolve())}


def log_model_folder(run_id: str, folder: str | Path, log_model: bool) -> None:
    """Copy the model folder into the run (``model/``) or record only where it is (a hub id as it is)."""
    client = _client()
    if not Path(folder).is_dir():
        client.set_tag(run_id, "model_path", str(folder))
        return
    client.set_tag(run_id, "model_path", str(Path(folder).resolve()))
    if log_model:
        client.log_artifacts(run_id, str(folder), "model")
    elif (Path(folder) / SPARSITY_MANIFEST_FILE).is_file():
        client.log_artifact(run_id, str(Path(folder) / SPARSITY_MANIFEST_FILE))


def prune_run_name(config: Mapping[str, Any]) -> str:
    tags = prune_tags(config)
    model = (tags["model"] or "model").rstrip("/").split("/")[-1]
    return f"prune-{model}-{tags['method']}-{tags['pattern']}"


# ------------------------------------------------------------------------------------------ evaluation
def log_perplexity(run_id: str, result: Mapping[str, Any]) -> None:
    """One PerplexityResult dict: the metric ``ppl/<dataset>`` and ``evaluation/ppl_<dataset>.json``."""
    log_metrics(run_id, {f"ppl/{result['dataset']}": result["perplexity"],
                         f"ppl_seconds/{result['dataset']}": result["seconds"]})
    _client().log_dict(run_id, dict(result), f"evaluation/ppl_{result['dataset']}.json")


def log_evaluation(run_id: str, zero_shot: Mapping[str, Any] | None = None, seconds: float | None = None) -> None:
    """Final metrics of an evaluation: with a ZeroShotResult dict, ``acc/<task>``, ``<task>/<metric>`` and
    lm-eval's results as a JSON artifact; the evaluation's total ``eval/seconds``."""
    client = _client()
    if seconds is not None:
        log_metrics(run_id, {"eval/seconds": seconds})
    if zero_shot:
        metrics = {f"acc/{task}": value for task, value in zero_shot["accuracy"].items()}
        for task, values in zero_shot["metrics"].items():
            metrics.update({f"{task}/{name}": value for name, value in values.items()})
        metrics["eval/zero_shot_seconds"] = zero_shot["seconds"]
        log_metrics(run_id, metrics)
        client.log_text(run_id, json.dumps(zero_shot["lm_eval"], indent=2, default=str),
                        "evaluation/lm_eval_results.json")


# ------------------------------------------------------------------------------------------ listing
RUN_COLUMNS = ("model", "method", "pattern")


def list_runs(model: str | None = None, method: str | None = None,
              experiment: str = DEFAULT_EXPERIMENT) -> list[dict[str, Any]]:
    """Tracked runs, newest first: id, name, status, model/method/pattern tags, the lm-eval limit and every
    metric's latest value."""
    client = _client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    filters = [f"tags.{key} = '{value}'" for key, value in (("model", model), ("method", method)) if value]
    runs = client.search_runs([found.experiment_id], " and ".join(filters), order_by=["attributes.start_time DESC"])
    return [
        {
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "status": run.info.status,
            **{key: run.data.tags.get(key, "") for key in RUN_COLUMNS},
            "limit": run.data.params.get("eval.limit", ""),  # lm-eval items per task ("None": all)
            "metrics": dict(run.data.metrics),
        }
        for run in runs
    ]

