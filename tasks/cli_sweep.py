"""``alps sweep``: one model pruned with several methods at several patterns (the flow ``flows/sweep.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from .cli import (
    DataDirOption, DeviceOption, ModelOption, ThreadsOption, app, console, parse_overrides, reports_user_errors,
    split_names,
)

__all__ = ["sweep_command"]


@app.command("sweep")
@reports_user_errors
def sweep_command(
    model: ModelOption = "smollm2-135m",
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods (see `alps prune --help`).")]
    = "alps,sparsegpt,wanda",
    patterns: Annotated[str, typer.Option("--patterns", help="Comma-separated patterns: 0.5, 0.7, 2:4, rows:0.7, "
                                          "channels:0.5, ...")] = "0.5,0.7,2:4",
    calib: Annotated[str, typer.Option("--calib", help="Calibration data set (pydoc needs no data root).")] = "pydoc",
    nsamples: Annotated[int, typer.Option("--nsamples", min=1, help="Calibration windows.")] = 16,
    seqlen: Annotated[int, typer.Option("--seqlen", help="Tokens per window (capped by the model).")] = 512,
    seed: Annotated[int, typer.Option("--seed", help="Calibration sampling seed.")] = 0,
    config: Annotated[Optional[list[str]], typer.Option("--config", help="Method setting key=value for every "
                                                        "method, repeatable.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Samples per block forward.")] = 8,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder of the sweep: one subfolder per "
                                         "configuration, summary and plot.")] = Path("out/sweep"),
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Shared task results and activations "
                                                      "(default $ALPS_CACHE_DIR/runs).", show_default=False)] = None,
    ppl: Annotated[str, typer.Option("--ppl", help="Comma-separated data sets to measure every pruned model's "
                                     "perplexity on (tracked in MLflow); '' for none.")] = "",
    max_windows: Annotated[Optional[int], typer.Option("--max-windows", help="Score only the first N perplexity "
                                                       "windows.", show_default=False)] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Configurations run at a time after "
                                             "the first (which captures the calibration inputs).")] = 1,
    track: Annotated[bool, typer.Option("--track", help="Log an MLflow parent run and one child run per "
                                        "configuration.")] = False,
    keep_activations: Annotated[bool, typer.Option("--keep-activations", help="Keep the calibration "
                                                   "activations the sweep created.")] = False,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Prune one model with every method at every pattern, sharing one calibration capture; prints a table."""
    from flows.sweep import sweep_models

    from .sweep import plan_sweep

    settings: dict[str, Any] = {
        "calibration": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "batch_size": batch_size,
        "method_config": parse_overrides(config or []), "device": device, "threads": threads,
        "data_dir": str(data_dir) if data_dir else None, "keep_activations": keep_activations,
    }
    plan_sweep(model, split_names(methods), split_names(patterns), settings, output, cache_dir)  # bad settings: exit 2 here
    evaluation = None
    if split_names(ppl):
        evaluation = {"perplexity": split_names(ppl), "tasks": [], "seqlen": seqlen, "max_windows": max_windows}
    summary = sweep_models(model=model, methods=split_names(methods), patterns=split_names(patterns), settings=settings,
                           output=output, cache_dir=cache_dir, evaluation=evaluation, concurrency=concurrency,
                           track=track)

    rows = summary["configurations"]
    datasets = sorted({name for row in rows for name in row.get("perplexity", {})})
    table = Table(title=f"Sweep of {model}")
    for column in ("method", "pattern", "sparsity", "mean layer error", *[f"ppl {d}" for d in datasets],
                   "seconds", "reused blocks"):
        table.add_column(column, justify="left" if column in ("method", "pattern") else "right")
    for row in rows:
        table.add_row(row["method"], row["pattern"], f"{row['sparsity']:.3f}", f"{row['mean_rel_error']:.5f}",
                      *[f"{row['perplexity'][d]:.3f}" for d in datasets], f"{row['seconds']:.1f}",
                      str(row["reused_blocks"]))
    console.print(table)
    console.print(f"summary {Path(summary['output']) / 'sweep_summary.json'}; plot {summary['plot']}")
