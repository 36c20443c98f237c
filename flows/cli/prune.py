"""``alps prune``: the pruning flow from the command line, with a table of the blocks at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from tasks.blockwise.report import PruneResult, block_error_rows
from tasks.common.errors import SettingError
from tasks.common.files import SPARSITY_MANIFEST_FILE
from tasks.config.prune import PruneConfig
from tasks.config.validation import spelled_as, validated

from .base import app, console, method_overrides, reports_user_errors, run_flow, split_names, stops_cleanly
from .options import (
    ActivationDtypeOption,
    AllocationOption,
    AllocationSpreadOption,
    BatchSizeOption,
    CacheDirOption,
    CalibrationDatasetOption,
    DataDirOption,
    DeviceOption,
    KeepActivationsOption,
    KeepEveryOption,
    MethodConfigOption,
    MethodOption,
    ModelOption,
    NsamplesOption,
    OffloadActivationsOption,
    RefineBatchOption,
    RefineEpochsOption,
    RefineLrOption,
    RefineOption,
    ResourceCheckOption,
    SeedOption,
    SeqlenOption,
    TargetMixOption,
    TargetsOption,
    ThreadsOption,
    TrackingOption,
)
from .track import report_tracking

__all__ = ["FLAGS", "prune_command"]

DEFAULT = PruneConfig()
EVALUATION = DEFAULT.evaluation
ALLOCATION = DEFAULT.solver.allocation
REFINE = DEFAULT.solver.refine
# Where each field of PruneConfig is set on the command line (errors name the flag the user typed).
FLAGS = {
    "model": "--model", "solver": "--config", "solver.method": "--method", "solver.pattern": "--pattern",
    "solver.structured": "--structured",
    "solver.method_config": "--config", "solver.true_sequential": "--true-sequential",
    "solver.gram_dtype": "--gram-dtype", "solver.targets": "--targets",
    "solver.target_mix": "--target-mix", "solver.allocation": "--allocation",
    "solver.allocation.method": "--allocation", "solver.allocation.spread": "--allocation-spread",
    "solver.allocation.outlier_threshold": "--owl-threshold",
    "solver.allocation.granularity": "--allocation-granularity", "solver.allocation.min_sparsity": "--sparsity-bounds",
    "solver.allocation.max_sparsity": "--sparsity-bounds", "solver.refine": "--refine",
    "solver.refine.method": "--refine", "solver.refine.epochs": "--refine-epochs", "solver.refine.lr": "--refine-lr",
    "solver.refine.batch": "--refine-batch", "calibration.dataset": "--calib",
    "calibration.nsamples": "--nsamples",
    "calibration.seqlen": "--seqlen", "calibration.seed": "--seed",
    "calibration.activation_dtype": "--activation-dtype", "runtime.keep_every": "--keep-every",
    "runtime.offload_activations": "--offload-activations", "runtime.device": "--device",
    "runtime.check_resources": "--no-resource-check",
    "runtime.threads": "--threads", "runtime.batch_size": "--batch-size", "runtime.task_runner": "--task-runner",
    "runtime.solve_workers": "--solve-workers", "runtime.runner_address": "--runner-address",
    "runtime.cache_dir": "--cache-dir", "runtime.data_dir": "--data-dir",
    "runtime.keep_activations": "--keep-activations", "output.folder": "--output", "output.overwrite": "--overwrite",
    "output.experiment": "--experiment", "output.log_model": "--log-model", "output.tracking": "--tracking",
    "evaluation.perplexity": "--eval-ppl",
    "evaluation.tasks": "--eval-tasks", "evaluation.limit": "--eval-limit",
    "evaluation.max_windows": "--eval-max-windows", "evaluation.seqlen": "--eval-seqlen",
}


@app.command("prune")
@reports_user_errors
@stops_cleanly
def prune_command(
    model: ModelOption = DEFAULT.model,
    method: MethodOption = DEFAULT.solver.method,
    sparsity: Annotated[Optional[str], typer.Option(
        "--sparsity", metavar="FLOAT", help=f"Unstructured sparsity in [0, 1), e.g. 0.7 (same as --pattern 0.7). "
        f"Default: {DEFAULT.solver.pattern}.", show_default=False)] = None,
    pattern: Annotated[Optional[str], typer.Option(
        "--pattern", help="'0.7', '2:4', '4:8', 'rows:0.7' or 'channels:0.5'.", show_default=False)] = None,
    structured: Annotated[Optional[str], typer.Option(
        "--structured", metavar="mlp:F,heads:F", help="Structured pruning that shrinks the model, instead of a "
        "pattern: remove a fraction F of each block's MLP neurons and/or attention heads (e.g. mlp:0.3,heads:0.25); "
        "the output is a smaller dense model.", show_default=False)] = None,
    calib: CalibrationDatasetOption = DEFAULT.calibration.dataset,
    nsamples: NsamplesOption = DEFAULT.calibration.nsamples,
    seqlen: SeqlenOption = DEFAULT.calibration.seqlen,
    seed: SeedOption = DEFAULT.calibration.seed,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the pruned model.")]
    = DEFAULT.output.folder,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")]
    = DEFAULT.output.overwrite,
    config: MethodConfigOption = None,
    true_sequential: Annotated[bool, typer.Option("--true-sequential", help="Solve each layer group on the "
                                                  "outputs of the already pruned groups.")]
    = DEFAULT.solver.true_sequential,
    batch_size: BatchSizeOption = DEFAULT.runtime.batch_size,
    gram_dtype: Annotated[str, typer.Option("--gram-dtype", help="float32 or float64 accumulation of X^T X.")]
    = DEFAULT.solver.gram_dtype,
    targets: TargetsOption = DEFAULT.solver.targets,
    target_mix: TargetMixOption = DEFAULT.solver.target_mix,
    allocation: AllocationOption = ALLOCATION.method,
    allocation_spread: AllocationSpreadOption = ALLOCATION.spread,
    allocation_granularity: Annotated[str, typer.Option("--allocation-granularity", help="What the error "
                                                        "allocation gives a sparsity of its own: layer, block, or "
                                                        "layer-in-block (every block at the target).")]
    = ALLOCATION.granularity,
    owl_threshold: Annotated[str, typer.Option("--owl-threshold", metavar="FLOAT", help="OWL's M: outliers are "
                                               "scores |W| ||x|| above M times their block's mean.")]
    = ALLOCATION.outlier_threshold,
    sparsity_bounds: Annotated[Optional[str], typer.Option("--sparsity-bounds", metavar="LOW,HIGH", help="The "
                                                           "least and most sparsity an allocation may give a layer "
                                                           f"(default {ALLOCATION.min_sparsity},"
                                                           f"{ALLOCATION.max_sparsity}).", show_default=False)]
    = None,
    refine: RefineOption = REFINE.method,
    refine_epochs: RefineEpochsOption = REFINE.epochs,
    refine_lr: RefineLrOption = REFINE.lr,
    refine_batch: RefineBatchOption = REFINE.batch,
    task_runner: Annotated[str, typer.Option("--task-runner", help="Where a block's layer solves run: threads, "
                                             "dask or ray (Prefect task runners).")] = DEFAULT.runtime.task_runner,
    solve_workers: Annotated[str, typer.Option("--solve-workers", metavar="INTEGER", help="Layer solves at once "
                                               "(1: in the block's own process).")] = DEFAULT.runtime.solve_workers,
    runner_address: Annotated[Optional[str], typer.Option("--runner-address", help="Existing Dask scheduler or "
                                                          "Ray cluster address.", show_default=False)] = None,
    device: DeviceOption = DEFAULT.runtime.device,
    threads: ThreadsOption = DEFAULT.runtime.threads,
    cache_dir: CacheDirOption = DEFAULT.runtime.cache_dir,
    data_dir: DataDirOption = DEFAULT.runtime.data_dir,
    keep_activations: KeepActivationsOption = DEFAULT.runtime.keep_activations,
    keep_every: KeepEveryOption = DEFAULT.runtime.keep_every,
    check_resources: ResourceCheckOption = DEFAULT.runtime.check_resources,
    offload_activations: OffloadActivationsOption = DEFAULT.runtime.offload_activations,
    activation_dtype: ActivationDtypeOption = DEFAULT.calibration.activation_dtype,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="Evaluate the pruned model at the end.")]
    = DEFAULT.evaluation is not None,
    eval_ppl: Annotated[Optional[str], typer.Option("--eval-ppl", help="Perplexity data sets, comma-separated "
                                                    "(default: the calibration set's evaluation text).",
                                                    show_default=False)] = None,
    eval_tasks: Annotated[str, typer.Option("--eval-tasks", help="lm-eval tasks, comma-separated, e.g. "
                                            "piqa,arc_easy ('' for none).")] = ",".join(EVALUATION.tasks),
    eval_limit: Annotated[Optional[str], typer.Option("--eval-limit", metavar="INTEGER", help="Items per lm-eval "
                                                      "task.", show_default=False)] = EVALUATION.limit,
    eval_max_windows: Annotated[Optional[str], typer.Option("--eval-max-windows", metavar="INTEGER", help="Score "
                                                            "only the first N perplexity windows.",
                                                            show_default=False)] = EVALUATION.max_windows,
    eval_seqlen: Annotated[str, typer.Option("--eval-seqlen", metavar="INTEGER", help="Perplexity window (capped "
                                             "by the model).")] = EVALUATION.seqlen,
    experiment: Annotated[str, typer.Option("--experiment", help="MLflow experiment.")] = DEFAULT.output.experiment,
    log_model: Annotated[bool, typer.Option("--log-model", help="Copy the pruned folder into the MLflow run.")]
    = DEFAULT.output.log_model,
    tracking: TrackingOption = DEFAULT.output.tracking,
) -> None:
    """Prune a model block by block into a Hugging Face folder; a rerun resumes from the cache."""
    from flows.prune import prune_model
    from tasks.blockwise.preflight import check_inputs

    if sparsity is not None and pattern is not None:
        raise SettingError("--sparsity/--pattern", f"{sparsity}/{pattern}", "both given",
                           "give one: --sparsity 0.7 or --pattern 2:4")
    names = FLAGS | ({"solver.pattern": "--sparsity"} if sparsity is not None else {})
    settings: dict[str, Any] = {
        "model": model,
        "solver": {"method": method, "method_config": method_overrides(config or [], [method]),
                   "true_sequential": true_sequential,
                   "gram_dtype": gram_dtype, "targets": targets, "target_mix": target_mix,
                   "allocation": {"method": allocation, "spread": allocation_spread,
                                  "outlier_threshold": owl_threshold, "granularity": allocation_granularity,
                                  **_bounds(sparsity_bounds)},
                   "refine": {"method": refine, "epochs": refine_epochs, "lr": refine_lr, "batch": refine_batch},
                   **({"pattern": pattern} if pattern is not None else {}),
                   **({"structured": structured} if structured is not None else {}),
                   **({"pattern": _fraction(sparsity)} if sparsity is not None else {})},
        "calibration": {"dataset": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
                        "activation_dtype": activation_dtype},
        "runtime": {"device": device, "threads": threads, "batch_size": batch_size, "task_runner": task_runner,
                    "solve_workers": solve_workers, "runner_address": runner_address, "cache_dir": cache_dir,
                    "data_dir": data_dir, "keep_activations": keep_activations,
                    "keep_every": keep_every, "offload_activations": offload_activations,
                    "check_resources": check_resources},
        "output": {"folder": output, "overwrite": overwrite, "experiment": experiment, "log_model": log_model,
                   "tracking": tracking},
        "evaluation": {"perplexity": split_names(eval_ppl) if eval_ppl is not None else None,
                       "tasks": split_names(eval_tasks), "limit": eval_limit, "max_windows": eval_max_windows,
                       "seqlen": eval_seqlen} if evaluate else None,
    }
    run = validated(PruneConfig, settings, names=names, fix="see `alps prune --help`")
    with spelled_as(names):
        check_inputs(run)  # before the flow starts: what can be checked without a weight loaded
    result = run_flow(prune_model, run)
    print_result(result)
    report_tracking(run.output.tracking, result.tracking_problem)


def _bounds(text: str | None) -> dict[str, str]:
    """``--sparsity-bounds LOW,HIGH`` as the allocation's fields (their ranges are the config's to check)."""
    if text is None:
        return {}
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise SettingError("--sparsity-bounds", text, "not two numbers", "give the least and most sparsity of a "
                           "layer as LOW,HIGH, e.g. --sparsity-bounds 0.5,0.9")
    return {"min_sparsity": parts[0], "max_sparsity": parts[1]}


def _fraction(sparsity: str) -> float:
    """``--sparsity`` as a number (its range is the pattern's to check): a pattern such as 2:4 goes to --pattern."""
    try:
        return float(sparsity)
    except ValueError:
        raise SettingError("--sparsity", sparsity, "not a number", "give a fraction in [0, 1) such as "
                           "--sparsity 0.7, or a structured pattern with --pattern (2:4, rows:0.7)") from None


def print_result(result: PruneResult) -> None:
    """The table of blocks, the totals, the evaluation's numbers and where the run is tracked (if it is)."""
    report = result.report
    config = report.config
    table = Table(title=f"{config.model} pruned with {config.solver.method} at "
                  f"{config.solver.structured or config.solver.pattern}")
    for column in ("block", "mean error", "worst layer error", "iterations", "seconds", "cached"):
        table.add_column(column, justify="right")
    for row in block_error_rows(report.to_json()):
        table.add_row(str(row["block"]), f"{row['mean_rel_error']:.5f}", f"{row['max_rel_error']:.5f}",
                      str(row["iterations"]), f"{row['seconds']:.1f}", "yes" if row["cached"] else "")
    console.print(table)
    console.print(f"mean layer error {report.mean_rel_error:.5f}; reused {len(report.reused_blocks)} blocks, "
                  f"computed {len(report.computed_blocks)}; model saved to {result.output}")
    if config.solver.structured is not None:
        manifest = json.loads((result.output / SPARSITY_MANIFEST_FILE).read_text(encoding="utf-8"))
        parameters = manifest["parameters"]
        console.print(f"smaller model: {', '.join(f'{k} {v}' for k, v in manifest['config'].items())}; parameters "
                      f"{parameters['before']:,} -> {parameters['after']:,} "
                      f"({manifest['removed_fraction']:.1%} fewer)")
    if result.evaluation:
        scores = [f"{name} perplexity {value:.3f}" for name, value in result.evaluation.perplexity.items()]
        scores += [f"{name} accuracy {value:.4f}" for name, value in result.evaluation.accuracy.items()]
        console.print("pruned model: " + "; ".join(scores))
    if result.tracking_problem is None:
        console.print(f"MLflow run {result.run_id} (see `alps runs`, or `mlflow ui --backend-store-uri "
                      "sqlite:///mlflow.db`)")
