"""``alps eval`` (the evaluation flow from the command line) and ``alps runs`` (tracked runs side by side)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from tasks.config.defaults import DEFAULT_EXPERIMENT
from tasks.config.evaluate import EvaluateConfig
from tasks.config.validation import spelled_as, validated

from .base import app, console, environment, reports_user_errors, run_flow, split_names, stops_cleanly
from .options import (
    DataDirOption,
    DeviceOption,
    DtypeOption,
    MaxWindowsOption,
    ModelOption,
    ResultsFileOption,
    ThreadsOption,
    TrackingOption,
    TrustRemoteCodeOption,
)
from .track import report_tracking

__all__ = ["eval_command", "runs_command"]

DEFAULT = EvaluateConfig()


@app.command("eval")
@reports_user_errors
@stops_cleanly
def eval_command(
    model: ModelOption = DEFAULT.model,
    ppl: Annotated[Optional[str], typer.Option(
        "--ppl", help="Comma-separated perplexity data sets: wikitext2, ptb, c4, pydoc. Default: "
        f"{','.join(DEFAULT.perplexity)} when --tasks is not given either, else none.", show_default=False)] = None,
    tasks: Annotated[Optional[str], typer.Option(
        "--tasks", help="Comma-separated lm-eval tasks: lambada, piqa, arc_easy, arc_challenge, mmlu (5-shot), "
        "gsm8k (8-shot CoT, generation). Default: none.", show_default=False)] = None,
    limit: Annotated[Optional[str], typer.Option("--limit", metavar="INTEGER", help="Items per lm-eval task (MMLU: "
                                                 "per subject).", show_default=False)] = DEFAULT.limit,
    seqlen: Annotated[str, typer.Option("--seqlen", metavar="INTEGER", help="Perplexity window in tokens.")]
    = DEFAULT.seqlen,
    max_windows: MaxWindowsOption = DEFAULT.max_windows,
    batch_size: Annotated[str, typer.Option("--batch-size", metavar="INTEGER", help="lm-eval batch size.")]
    = DEFAULT.batch_size,
    log_model: Annotated[bool, typer.Option("--log-model", help="Copy the model folder into the MLflow run "
                                            "(default: record its path).")] = DEFAULT.log_model,
    experiment: Annotated[str, typer.Option("--experiment", help="MLflow experiment.")] = DEFAULT.experiment,
    tracking: TrackingOption = DEFAULT.tracking,
    dtype: DtypeOption = DEFAULT.dtype,
    device: DeviceOption = DEFAULT.device,
    data_dir: DataDirOption = DEFAULT.data_dir,
    output: ResultsFileOption = None,
    threads: ThreadsOption = DEFAULT.threads,
    trust_remote_code: TrustRemoteCodeOption = DEFAULT.trust_remote_code,
) -> None:
    """Perplexity and lm-eval accuracy of a model, tracked in MLflow; prints a table.

    Measures what --ppl and --tasks ask for; with neither, the WikiText-2 perplexity (papers' protocol)."""
    from flows.evaluate import evaluate_model
    from tasks.common.files import atomic_write_json
    from tasks.data.registry import resolve_data_root
    from tasks.model.loading import resolve_device
    from tasks.model.references import locate_model

    measures: dict[str, Any] = {}
    if ppl is not None or tasks is not None:  # only what was asked for
        measures = {"perplexity": split_names(ppl or ""), "tasks": split_names(tasks or "")}
    names = {name: f"--{name.replace('_', '-')}" for name in EvaluateConfig.model_fields} | {"perplexity": "--ppl"}
    config = validated(EvaluateConfig, {
        **measures, "model": model, "limit": limit, "seqlen": seqlen, "max_windows": max_windows,
        "batch_size": batch_size, "dtype": dtype, "device": device, "threads": threads, "data_dir": data_dir,
        "log_model": log_model, "experiment": experiment, "tracking": tracking, "trust_remote_code": trust_remote_code,
    }, names=names, fix="see `alps eval --help`")
    with spelled_as(names):  # before the flow starts: the model, the device and the data root are there
        locate_model(config.model)
        resolve_device(config.device)
        resolve_data_root(config.data_dir)
    summary = run_flow(evaluate_model, config)

    table = Table(title=f"Evaluation of {model}" + (f" (lm-eval limit {limit})" if limit else ""))
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in summary.perplexity.items():
        table.add_row(f"perplexity {name}", f"{value:.3f}")
    for name, value in summary.accuracy.items():
        table.add_row(f"accuracy {name}", f"{value:.4f}")
    table.add_row("seconds", f"{summary.seconds:.1f}")
    console.print(table)
    if summary.tracking_problem is None:
        console.print(f"MLflow run {summary.run_id}")
    if output is not None:
        atomic_write_json(output, {"settings": config.model_dump(mode="json"), **summary.model_dump(mode="json"),
                                   "environment": environment()})
        console.print(f"Wrote {output}")
    report_tracking(config.tracking, summary.tracking_problem)


@app.command("runs")
@reports_user_errors
def runs_command(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Only runs of this model reference.",
                                                 show_default=False)] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="Only runs of this method (dense: "
                                                  "unpruned evaluations).", show_default=False)] = None,
    experiment: Annotated[str, typer.Option("--experiment", help="MLflow experiment.")] = DEFAULT_EXPERIMENT,
) -> None:
    """List tracked runs side by side: method, pattern, perplexities, accuracies, time."""
    from tasks.tracking.runs import list_runs, tracking_uri

    runs = list_runs(model=model, method=method, experiment=experiment)
    if not runs:
        console.print(f"No runs in experiment {experiment!r} at {tracking_uri()}.")
        return
    columns = _metric_columns(runs)
    table = Table(title=f"Runs in {experiment!r} ({tracking_uri()})")
    for column in ("run", "model", "method", "pattern", "status", "limit", *columns):
        table.add_column(column, justify="right" if column in columns else "left", overflow="fold")
    for run in runs:
        metrics = run["metrics"]
        values = [_format(name, metrics.get(name)) for name in columns]
        table.add_row(run["run_id"][:8], Path(run["model"]).name or run["model"], run["method"], run["pattern"],
                      run["status"], "" if run["limit"] == "None" else run["limit"], *values)
    console.print(table)


def _metric_columns(runs: list[dict[str, Any]]) -> list[str]:
    """Perplexities, accuracies, mean error and times present in any run, in that order."""
    present = {name for run in runs for name in run["metrics"]}
    ordered = sorted(n for n in present if n.startswith("ppl/")) + sorted(n for n in present if n.startswith("acc/"))
    return ordered + [n for n in ("prune/mean_rel_error", "prune/seconds", "eval/seconds") if n in present]


def _format(name: str, value: float | None) -> str:
    if value is None:
        return ""
    if name.startswith("acc/"):
        return f"{value:.4f}"
    if name.endswith("seconds"):
        return f"{value:.1f}"
    return f"{value:.5f}" if name.startswith("prune/") else f"{value:.3f}"
