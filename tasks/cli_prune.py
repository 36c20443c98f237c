"""``alps prune``: run the pruning flow from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .cli import (
    DataDirOption, DeviceOption, ModelOption, ThreadsOption, app, console, parse_overrides, reports_user_errors,
    split_names,
)
from .errors import SettingError
from .storage import PRUNE_REPORT_FILE

__all__ = ["prune_command"]


@app.command("prune")
@reports_user_errors
def prune_command(
    model: ModelOption = "smollm2-135m",
    method: Annotated[str, typer.Option("--method", help="alps, alps-simple, sparsegpt, wanda, magnitude, dsnot, "
                                        "admm_fixed_mask or admm_fixed_rho.")] = "alps",
    sparsity: Annotated[Optional[float], typer.Option("--sparsity", help="Unstructured sparsity, e.g. 0.7 "
                                                      "(same as --pattern 0.7).", show_default=False)] = None,
    pattern: Annotated[Optional[str], typer.Option("--pattern", help="'0.7', '2:4', '4:8', 'rows:0.7' or "
                                                   "'channels:0.5'.", show_default=False)] = None,
    calib: Annotated[str, typer.Option("--calib", help="Calibration data set: c4, wikitext2, pydoc (needs no "
                                       "data root), ...")] = "c4",
    nsamples: Annotated[int, typer.Option("--nsamples", min=1, help="Calibration windows.")] = 128,
    seqlen: Annotated[int, typer.Option("--seqlen", help="Tokens per window (capped by the model).")] = 2048,
    seed: Annotated[int, typer.Option("--seed", help="Calibration sampling seed.")] = 0,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the pruned model.")] = Path("out"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")] = False,
    config: Annotated[Optional[list[str]], typer.Option("--config", help="Method setting key=value, repeatable "
                                                        "(e.g. max_iter=100, schedule.rho_init=0.3).")] = None,
    true_sequential: Annotated[bool, typer.Option("--true-sequential", help="Solve each layer group on the "
                                                  "outputs of the already pruned groups.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Samples per block forward.")] = 8,
    gram_dtype: Annotated[str, typer.Option("--gram-dtype", help="float32 or float64 accumulation of X^T X.")] = "float32",
    task_runner: Annotated[str, typer.Option("--task-runner", help="Where a block's layer solves run: threads, "
                                             "dask or ray (Prefect task runners).")] = "threads",
    solve_workers: Annotated[int, typer.Option("--solve-workers", min=1, help="Layer solves at once (1: in the "
                                               "block's own process).")] = 1,
    runner_address: Annotated[Optional[str], typer.Option("--runner-address", help="Existing Dask scheduler or "
                                                          "Ray cluster address.", show_default=False)] = None,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Task results and activations "
                                                      "(default $ALPS_CACHE_DIR/runs).", show_default=False)] = None,
    data_dir: DataDirOption = None,
    keep_activations: Annotated[bool, typer.Option("--keep-activations", help="Keep block activations after "
                                                   "a successful run.")] = False,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="Evaluate the pruned model at the end.")] = True,
    eval_ppl: Annotated[Optional[str], typer.Option("--eval-ppl", help="Perplexity data sets, comma-separated "
                                                    "(default: the calibration set's evaluation text).",
                                                    show_default=False)] = None,
    eval_tasks: Annotated[str, typer.Option("--eval-tasks", help="lm-eval tasks, comma-separated, e.g. "
                                            "piqa,arc_easy.")] = "",
    eval_limit: Annotated[Optional[int], typer.Option("--eval-limit", min=1, help="Items per lm-eval task.",
                                                      show_default=False)] = None,
    eval_max_windows: Annotated[Optional[int], typer.Option("--eval-max-windows", min=1, help="Score only the "
                                                            "first N perplexity windows.", show_default=False)] = None,
    eval_seqlen: Annotated[int, typer.Option("--eval-seqlen", help="Perplexity window (capped by the "
                                             "model).")] = 2048,
    experiment: Annotated[str, typer.Option("--experiment", help="MLflow experiment.")] = "alps",
    log_model: Annotated[bool, typer.Option("--log-model", help="Copy the pruned folder into the MLflow run.")] = False,
) -> None:
    """Prune a model block by block into a Hugging Face folder; a rerun resumes from the cache."""
    from pydantic import ValidationError

    from flows.prune import prune_model

    from .prune_config import PruneConfig

    if sparsity is not None and pattern is not None:
        raise SettingError("--sparsity/--pattern", f"{sparsity}/{pattern}", "both given",
                           "give one: --sparsity 0.7 or --pattern 2:4")
    chosen = pattern if pattern is not None else str(sparsity if sparsity is not None else 0.7)
    try:
        settings = PruneConfig(
            model=model, method=method, method_config=parse_overrides(config or []), pattern=chosen,
            calibration=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, device=device,
            true_sequential=true_sequential, gram_dtype=gram_dtype, batch_size=batch_size, threads=threads,
            task_runner=task_runner, solve_workers=solve_workers, runner_address=runner_address,
            output=output, overwrite=overwrite, cache_dir=cache_dir, data_dir=data_dir,
            keep_activations=keep_activations, evaluate=evaluate,
            eval_ppl=split_names(eval_ppl) if eval_ppl is not None else None, eval_tasks=split_names(eval_tasks),
            eval_limit=eval_limit, eval_max_windows=eval_max_windows, eval_seqlen=eval_seqlen, experiment=experiment,
            log_model=log_model,
        )
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "settings"
        raise SettingError(field, first.get("input"), first["msg"], "see `alps prune --help`") from None
    result = prune_model(settings)

    report = json.loads((Path(result["output"]) / PRUNE_REPORT_FILE).read_text())
    table = Table(title=f"{settings.model} pruned with {settings.method} at {settings.pattern}")
    for column in ("block", "mean error", "worst layer error", "iterations", "seconds", "cached"):
        table.add_column(column, justify="right")
    for block in report["blocks"]:
        errors = [layer["rel_error"] for layer in block["layers"]]
        table.add_row(str(block["index"]), f"{sum(errors) / len(errors):.5f}", f"{max(errors):.5f}",
                      str(sum(layer["iterations"] for layer in block["layers"])), f"{block['seconds']:.1f}",
                      "yes" if block["cached"] else "")
    console.print(table)
    console.print(f"mean layer error {report['mean_rel_error']:.5f}; reused {len(result['reused_blocks'])} "
                  f"blocks, computed {len(result['computed_blocks'])}; model saved to {result['output']}")
    evaluation = result.get("evaluation")
    if evaluation:
        scores = [f"{name} perplexity {value:.3f}" for name, value in evaluation["perplexity"].items()]
        scores += [f"{name} accuracy {value:.4f}" for name, value in evaluation["accuracy"].items()]
        console.print("pruned model: " + "; ".join(scores))
    console.print(f"MLflow run {result['run_id']} (see `alps runs`, or `mlflow ui --backend-store-uri "
                  "sqlite:///mlflow.db`)")
