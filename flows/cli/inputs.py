"""``alps models``, ``alps data`` and ``alps ppl``: a run's inputs (what can be loaded, which data is where) and
a model's perplexity.

Heavy libraries (torch, transformers) are imported inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from tasks.common.errors import SettingError
from tasks.config.defaults import DEFAULT_MODEL

from .base import app, console, environment, reports_user_errors, stops_cleanly
from .options import (
    DataDirOption,
    DeviceOption,
    DtypeOption,
    ModelOption,
    ResultsFileOption,
    ThreadsOption,
    TrustRemoteCodeOption,
)

__all__ = ["data_command", "models_command", "ppl_command"]


@app.command("models")
@reports_user_errors
def models_command() -> None:
    """List the bundled models and the other kinds of model reference that load."""
    from tasks.common.files import CACHE_DIR_ENV, cache_root
    from tasks.model.references import ACCEPTED_REFERENCES, BUNDLED_MODELS, describe_bundled_models

    table = Table(title="Bundled models")
    for column in ("name", "description", "status"):
        table.add_column(column)
    for row in describe_bundled_models():
        table.add_row(row["name"], row["description"], row["status"])
    console.print(table)
    console.print(f"Accepted --model values: {ACCEPTED_REFERENCES.format(bundled=', '.join(BUNDLED_MODELS))}.")
    console.print(f"Converted models are cached under {cache_root()} (set {CACHE_DIR_ENV} to move it).")


@app.command("data")
@reports_user_errors
def data_command(data_dir: DataDirOption = None) -> None:
    """List every data set and split: what it is used for, where it is found, and its item count."""
    from tasks.data.loading import describe_datasets
    from tasks.data.registry import DATA_DIR_ENV, resolve_data_root

    root = resolve_data_root(data_dir)
    rows = describe_datasets(data_dir)
    table = Table(title=f"Data sets (data root: {root})" if root else "Data sets (no data root: Hugging Face hub)")
    for column in ("dataset", "split", "use", "source", "status", "items"):
        table.add_column(column, justify="right" if column == "items" else "left", overflow="fold")
    for row in rows:
        items = "" if row["count"] is None else str(row["count"])
        table.add_row(row["dataset"], row["split"], row["use"], row["source"], row["status"], items)
    console.print(table)
    if root is None:
        console.print(f"Set {DATA_DIR_ENV} or pass --data-dir to use local files instead of the hub.")


@app.command("ppl")
@reports_user_errors
@stops_cleanly
def ppl_command(
    model: ModelOption = DEFAULT_MODEL,
    datasets: Annotated[
        str, typer.Option("--datasets", "-d", help="Comma-separated text data sets: wikitext2, ptb, c4, pydoc.")
    ] = "wikitext2,ptb,c4",
    seqlen: Annotated[
        int, typer.Option("--seqlen", help="Window length in tokens (capped at the model's maximum positions).")
    ] = 2048,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass (memory).")] = 1,
    max_windows: Annotated[
        Optional[int],
        typer.Option("--max-windows", help="Score only the first N windows of each data set.", show_default=False),
    ] = None,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    data_dir: DataDirOption = None,
    output: ResultsFileOption = None,
    threads: ThreadsOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Measure the perplexity of a model on text data sets (papers' protocol) and print a table."""
    from tasks.common.files import atomic_write_json
    from tasks.data.registry import DATASETS, DatasetKind, dataset_spec, resolve_data_root
    from tasks.data.sampling import check_seqlen
    from tasks.evaluation.perplexity import evaluate_perplexity
    from tasks.model.loading import load_model
    from tasks.model.references import resolve_model

    # Check every input before the model loads (that can take a while).
    text_datasets = ", ".join(name for name, spec in DATASETS.items() if spec.kind is DatasetKind.TEXT)
    names = [name.strip() for name in datasets.split(",") if name.strip()]
    if not names:
        raise SettingError(
            "--datasets", datasets, "no data set named", f"use a comma-separated list of {text_datasets}"
        )
    for name in names:
        if dataset_spec(name).kind is not DatasetKind.TEXT:
            raise SettingError("--datasets", name, "a zero-shot task has no perplexity text", f"use {text_datasets}")
    check_seqlen(seqlen)
    root = resolve_data_root(data_dir)
    _set_threads(threads)

    resolved = resolve_model(model)
    loaded, tokenizer = load_model(resolved, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    results = [
        evaluate_perplexity(
            loaded, tokenizer, name, seqlen=seqlen, batch_size=batch_size, max_windows=max_windows, data_dir=root
        )
        for name in names
    ]

    table = Table(title=f"Perplexity of {model}")
    for column in ("dataset", "perplexity", "seqlen", "windows", "tokens", "seconds"):
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for result in results:
        table.add_row(
            result.dataset,
            f"{result.perplexity:.3f}",
            str(result.seqlen),
            f"{result.windows}/{result.available_windows}",
            str(result.tokens_scored),
            f"{result.seconds:.1f}",
        )
    console.print(table)
    if output is not None:
        atomic_write_json(
            output,
            {
                "model": resolved.to_dict(),
                "settings": {
                    "datasets": names,
                    "seqlen": seqlen,
                    "batch_size": batch_size,
                    "max_windows": max_windows,
                    "dtype": dtype,
                    "device": str(next(loaded.parameters()).device),
                    "data_root": str(root) if root else "hub",
                },
                "results": [result.to_dict() for result in results],
                "environment": environment(),
            },
        )
        console.print(f"Wrote {output}")


def _set_threads(threads: str | None) -> None:
    if threads is not None:
        import torch

        if not threads.isdigit() or int(threads) < 1:
            raise SettingError("--threads", threads, "not a whole number of at least 1", "e.g. --threads 4")
        torch.set_num_threads(int(threads))
