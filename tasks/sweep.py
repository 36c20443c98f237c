"""Tasks of the sweep flow (``flows/sweep.py``): plan one pruning configuration per (method, pattern), run
each as a subflow of ``prune_model``, and summarise them as a table artifact, a JSON file and a plot.

Every configuration shares one cache folder, so the calibration inputs (whose cache key holds the model,
data set, nsamples, seqlen and seed, but not the method or pattern) are captured once and reused. For that
the configurations keep their activations; the sweep deletes the activation files it created at the end.

MLflow is optional: only ``track=True`` or an evaluation imports ``tasks.tracking`` (one parent run for the
sweep, one child run per configuration, tagged ``mlflow.parentRunId``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import ValidationError

from alps_solver import SparsityPattern

from .errors import SettingError
from .logs import run_logger
from .prune_config import PruneConfig
from .remote import register_by_reference
from .storage import PRUNE_REPORT_FILE, atomic_write, atomic_write_json

__all__ = [
    "SUMMARY_FILE",
    "PLOT_FILE",
    "SweepFailed",
    "configuration_folder",
    "plan_sweep",
    "activation_files",
    "release_new_activations",
    "run_configuration",
    "summarize_sweep",
    "plot_sweep",
]

logger = logging.getLogger(__name__)

SUMMARY_FILE = "sweep_summary.json"
PLOT_FILE = "sweep_error.png"
SUMMARY_ARTIFACT = "sweep-summary"
# Set by the sweep for every configuration; the rest of PruneConfig comes from ``settings``.
_SWEEP_FIELDS = ("model", "method", "pattern", "output", "cache_dir", "overwrite")
_ACTIVATIONS = "activations"  # where the pruning tasks keep activation files inside a cache folder


class SweepFailed(RuntimeError):
    """One or more configurations of a sweep failed (the others finished and are in the summary)."""



def configuration_folder(method: str, pattern: str) -> str:
    """Subfolder name of one configuration's output: ``alps-0.7``, ``alps-2_4``, ``wanda-rows_0.7``."""
    return f"{method}-{pattern.replace(':', '_')}"


def plan_sweep(model: str, methods: list[str], patterns: list[str], settings: dict[str, Any], output: Path,
               cache_dir: Path | None) -> list[PruneConfig]:
    """One validated PruneConfig per (method, pattern), method-major, all sharing ``cache_dir``."""
    if not methods or not patterns:
        raise SettingError("methods/patterns", (methods, patterns), "a sweep needs at least one of each",
                           "e.g. methods=['alps', 'wanda'], patterns=['0.5', '0.7']")
    reserved = sorted(set(settings) & set(_SWEEP_FIELDS))
    if reserved:
        raise SettingError("settings", reserved, "these are set by the sweep for every configuration",
                           "pass them as the sweep's own parameters (model, methods, patterns, output, cache_dir)")
    configs = []
    for method in methods:
        for pattern in patterns:
            try:
                # The sweep owns its configurations' folders: a rerun (the next night) replaces them.
                configs.append(PruneConfig(**{**settings, "keep_activations": True}, model=model, method=method,
                                           pattern=pattern, cache_dir=cache_dir, overwrite=True,
                                           output=Path(output) / configuration_folder(method, str(pattern))))
            except ValidationError as error:
                first = error.errors()[0]
                field = ".".join(str(p) for p in first["loc"]) or "settings"
                raise SettingError(field, first.get("input"), first["msg"], "see PruneConfig's fields") from None
    return configs


def activation_files(store: Path) -> set[Path]:
    return set((Path(store) / _ACTIVATIONS).glob("*.safetensors"))


@task(name="release-sweep-activations", cache_policy=NO_CACHE)
def release_new_activations(store: Path, before: set[Path]) -> int:
    """Delete the activation files that appeared in ``store`` during the sweep (cached results stay valid:
    a later run whose inputs are gone recomputes them)."""
    created = activation_files(store) - set(before)
    for path in created:
        path.unlink(missing_ok=True)
    return len(created)


@task(name="run-configuration", task_run_name="configuration-{config.method}-{config.pattern}",
      cache_policy=NO_CACHE)
def run_configuration(config: PruneConfig, evaluation: dict[str, Any] | None = None,
                      parent_run: str | None = None) -> dict[str, Any]:
    """Prune with ``config`` as a subflow (evaluating the output if ``evaluation`` is given, as EvaluateConfig
    fields); one summary row. The subflow's MLflow run is a child of ``parent_run``. A failed configuration
    is a row with status ``failed`` and its error, not an exception."""
    from flows.prune import prune_model

    config = PruneConfig(**{**config.model_dump(), **_evaluation_settings(evaluation)})
    state = prune_model(config, parent_run_id=parent_run, return_state=True)
    row: dict[str, Any] = {"method": config.method, "pattern": config.pattern,
                           "sparsity": config.sparsity_pattern.sparsity, "output": str(Path(config.output).resolve()),
                           "flow_run_id": str(state.state_details.flow_run_id)}
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        run_logger(logger).error("%s at %s failed: %s", config.method, config.pattern, result)
        return {**row, "status": "failed", "error": f"{type(result).__name__}: {result}"}
    report = json.loads((Path(result["output"]) / PRUNE_REPORT_FILE).read_text(encoding="utf-8"))
    row.update(status="completed", mean_rel_error=report["mean_rel_error"], seconds=result["seconds"],
               reused_blocks=len(result["reused_blocks"]), computed_blocks=len(result["computed_blocks"]),
               mlflow_run_id=result["run_id"])
    if "evaluation" in result:
        row["perplexity"] = result["evaluation"]["perplexity"]
    return row


_EVALUATION_FIELDS = {"perplexity": "eval_ppl", "tasks": "eval_tasks", "limit": "eval_limit",
                      "max_windows": "eval_max_windows", "seqlen": "eval_seqlen"}


def _evaluation_settings(evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """EvaluateConfig fields as the PruneConfig fields that make the prune flow evaluate its output."""
    if evaluation is None:
        return {"evaluate": False}
    unknown = sorted(set(evaluation) - set(_EVALUATION_FIELDS))
    if unknown:
        raise SettingError("evaluation", unknown, "not evaluation settings a sweep can pass on",
                           f"use {', '.join(_EVALUATION_FIELDS)}")
    return {"evaluate": True, **{_EVALUATION_FIELDS[k]: v for k, v in evaluation.items()}}


@task(name="summarize-sweep", cache_policy=NO_CACHE)
def summarize_sweep(model: str, rows: list[dict[str, Any]], output: Path) -> dict[str, Any]:
    """The summary table artifact (``sweep-summary``), ``sweep_summary.json`` and the plot in ``output``."""
    output = Path(output).resolve()
    table = [{"method": r["method"], "pattern": r["pattern"], "sparsity": round(r["sparsity"], 4),
              "status": r["status"], "mean layer error": _rounded(r.get("mean_rel_error")),
              **{f"ppl {name}": _rounded(value) for name, value in r.get("perplexity", {}).items()},
              "seconds": _rounded(r.get("seconds"), 1), "reused blocks": r.get("reused_blocks", ""),
              "output": r["output"]} for r in rows]
    create_table_artifact(table=table, key=SUMMARY_ARTIFACT,
                          description=f"Sweep of {model}: {len(rows)} configurations, outputs under {output}")
    plot = atomic_write(output / PLOT_FILE, lambda p: _save_figure(plot_sweep(model, rows), p))
    summary = {"model": model, "output": str(output), "plot": str(plot), "configurations": rows}
    atomic_write_json(output / SUMMARY_FILE, summary)
    run_logger(logger).info("sweep of %s: %d configurations (%d failed); summary in %s", model, len(rows),
                sum(r["status"] != "completed" for r in rows), output / SUMMARY_FILE)
    return summary


def _rounded(value: float | None, digits: int = 5) -> float | str:
    return "" if value is None else round(float(value), digits)


def _save_figure(figure: Any, path: Path) -> None:
    figure.savefig(path, format="png")
    figure.clear()


def plot_sweep(model: str, rows: list[dict[str, Any]]):  # noqa: ANN201 (a matplotlib Figure)
    """Mean layer error against sparsity, one line per method and pattern kind; a perplexity panel per
    evaluated data set when the rows carry perplexities."""
    import matplotlib

    matplotlib.use("Agg")  # files only, whatever the environment's display
    from matplotlib.figure import Figure

    done = [r for r in rows if r["status"] == "completed"]
    datasets = sorted({name for r in done for name in r.get("perplexity", {})})
    panels = [("mean relative layer error", lambda r: r["mean_rel_error"])]
    panels += [(f"perplexity ({name})", lambda r, name=name: r.get("perplexity", {}).get(name)) for name in datasets]
    colors = {method: f"C{i}" for i, method in enumerate(dict.fromkeys(r["method"] for r in done))}
    figure = Figure(figsize=(5 * len(panels), 4), dpi=100, layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, value) in zip(axes, panels):
        ax.set_title(f"{model}: {label}", fontsize="medium")
        ax.set_xlabel("sparsity")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for row in done:
            if value(row) is not None:
                kind = SparsityPattern.parse(row["pattern"]).kind.value
                lines.setdefault((row["method"], kind), []).append((row["sparsity"], value(row)))
        for (method, kind), points in sorted(lines.items()):
            points.sort()
            unstructured = kind == "unstructured"
            ax.plot([x for x, _ in points], [y for _, y in points], color=colors[method],
                    marker="o" if unstructured else "s", linestyle="-" if unstructured else "--",
                    label=method if unstructured else f"{method} ({kind})")
        if lines:
            ax.legend(fontsize="small")
    return figure


register_by_reference(globals())  # Dask/Ray workers import these tasks and flows (see tasks/remote.py)
