"""``alps sweep``: one model pruned with several methods at several patterns (the flow ``flows/sweep.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from tasks.config.prune import OutputConfig
from tasks.config.sweep import SweepConfig
from tasks.config.validation import spelled_as, validated

from .base import app, console, method_overrides, reports_user_errors, run_flow, split_names, stops_cleanly
from .options import (
    ActivationDtypeOption,
    BatchSizeOption,
    CacheDirOption,
    CalibrationDatasetOption,
    DataDirOption,
    DeviceOption,
    KeepActivationsOption,
    KeepEveryOption,
    MaxWindowsOption,
    MethodConfigOption,
    ModelOption,
    NsamplesOption,
    OffloadActivationsOption,
    ResourceCheckOption,
    SeedOption,
    SeqlenOption,
    ThreadsOption,
    TrackingOption,
)
from .track import report_tracking

__all__ = ["sweep_command"]

DEFAULT = SweepConfig()
FLAGS = {"model": "--model", "methods": "--methods", "solver": "--config", "patterns": "--patterns",
         "solver.pattern": "--patterns", "solver.method_config": "--config",
         "calibration.dataset": "--calib", "calibration.nsamples": "--nsamples", "calibration.seqlen": "--seqlen",
         "calibration.seed": "--seed", "calibration.activation_dtype": "--activation-dtype",
         "runtime.keep_every": "--keep-every", "runtime.offload_activations": "--offload-activations",
         "runtime.check_resources": "--no-resource-check",
         "runtime.batch_size": "--batch-size", "runtime.device": "--device",
         "runtime.threads": "--threads", "runtime.cache_dir": "--cache-dir", "runtime.data_dir": "--data-dir",
         "output": "--output", "output.folder": "--output", "evaluation.perplexity": "--ppl",
         "evaluation.max_windows": "--max-windows",
         "concurrency": "--concurrency", "tracking": "--tracking"}


@app.command("sweep")
@reports_user_errors
@stops_cleanly
def sweep_command(
    model: ModelOption = DEFAULT.model,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods (see `alps prune --help`).")]
    = ",".join(DEFAULT.methods),
    patterns: Annotated[str, typer.Option("--patterns", help="Comma-separated patterns: 0.5, 0.7, 2:4, rows:0.7, "
                                          "channels:0.5, ...")] = ",".join(str(p) for p in DEFAULT.patterns),
    calib: CalibrationDatasetOption = DEFAULT.calibration.dataset,
    nsamples: NsamplesOption = DEFAULT.calibration.nsamples,
    seqlen: SeqlenOption = DEFAULT.calibration.seqlen,
    seed: SeedOption = DEFAULT.calibration.seed,
    config: MethodConfigOption = None,
    batch_size: BatchSizeOption = DEFAULT.runtime.batch_size,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder of the sweep: one subfolder per "
                                         "configuration, summary and plot.")] = DEFAULT.output,
    cache_dir: CacheDirOption = DEFAULT.runtime.cache_dir,
    ppl: Annotated[str, typer.Option("--ppl", help="Comma-separated data sets to measure every pruned model's "
                                     "perplexity on (tracked in MLflow); '' for none.")] = "",
    max_windows: MaxWindowsOption = None,
    concurrency: Annotated[str, typer.Option("--concurrency", metavar="INTEGER", help="Configurations run at a "
                                             "time after the first (which captures the calibration inputs).")]
    = DEFAULT.concurrency,
    track: Annotated[bool, typer.Option("--track", help="Log an MLflow parent run and one child run per "
                                        "configuration.")] = DEFAULT.track,
    tracking: TrackingOption = DEFAULT.tracking,
    keep_activations: KeepActivationsOption = DEFAULT.runtime.keep_activations,
    keep_every: KeepEveryOption = DEFAULT.runtime.keep_every,
    check_resources: ResourceCheckOption = DEFAULT.runtime.check_resources,
    offload_activations: OffloadActivationsOption = DEFAULT.runtime.offload_activations,
    activation_dtype: ActivationDtypeOption = DEFAULT.calibration.activation_dtype,
    device: DeviceOption = DEFAULT.runtime.device,
    threads: ThreadsOption = DEFAULT.runtime.threads,
    data_dir: DataDirOption = DEFAULT.runtime.data_dir,
) -> None:
    """Prune one model with every method at every pattern, sharing one cache folder; prints a table."""
    from flows.sweep import sweep_models
    from tasks.blockwise.preflight import check_inputs, check_output_folder

    settings: dict[str, Any] = {
        "model": model, "methods": split_names(methods), "patterns": split_names(patterns),
        "solver": {"method_config": method_overrides(config or [], split_names(methods))},
        "calibration": {"dataset": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
                        "activation_dtype": activation_dtype},
        "runtime": {"batch_size": batch_size, "device": device, "threads": threads, "cache_dir": cache_dir,
                    "data_dir": data_dir, "keep_activations": keep_activations,
                    "keep_every": keep_every, "offload_activations": offload_activations,
                    "check_resources": check_resources},
        "output": output, "concurrency": concurrency, "track": track, "tracking": tracking,
        "evaluation": {"perplexity": split_names(ppl), "seqlen": seqlen, "max_windows": max_windows}
        if split_names(ppl) else None,
    }
    sweep = validated(SweepConfig, settings, names=FLAGS, fix="see `alps sweep --help`")
    with spelled_as(FLAGS):  # before the flow starts: what can be checked without a weight loaded
        check_output_folder(OutputConfig(folder=sweep.output, overwrite=True))
        check_inputs(sweep.plan()[0], other_patterns=sweep.patterns[1:])
    summary = run_flow(sweep_models, sweep)

    rows = summary.configurations
    datasets = sorted({name for row in rows for name in row.perplexity})
    table = Table(title=f"Sweep of {model}")
    for column in ("method", "pattern", "sparsity", "mean layer error", *[f"ppl {d}" for d in datasets],
                   "seconds", "reused blocks"):
        table.add_column(column, justify="left" if column in ("method", "pattern") else "right")
    for row in rows:
        table.add_row(row.method, row.pattern, f"{row.sparsity:.3f}", f"{row.mean_rel_error:.5f}",
                      *[f"{row.perplexity[d]:.3f}" for d in datasets], f"{row.seconds:.1f}", str(row.reused_blocks))
    console.print(table)
    console.print(f"summary {summary.output / 'sweep_summary.json'}; plot {summary.plot}")
    report_tracking(sweep.tracking, *[f"{row.method} at {row.pattern}: {row.tracking_problem}"
                                      for row in summary.untracked])
