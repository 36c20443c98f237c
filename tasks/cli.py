"""The ``alps`` command line: one Typer app; every subcommand has ``--help``.

Commands: ``models`` (what can be loaded), ``data`` (which data sets are found where, with counts),
``ppl`` (dense perplexity). Further commands (prune, eval) are added to the same ``app`` with
``@app.command(...)`` and ``@reports_user_errors``, reusing the shared option types below.

Heavy libraries (torch, transformers) are imported inside the commands that need them, so ``--help``
stays fast.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from .errors import AlpsError, SettingError

__all__ = ["app", "parse_overrides", "reports_user_errors", "split_names"]

app = typer.Typer(
    name="alps",
    help="One-shot LLM pruning with ALPS: list models and data, measure perplexity.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()
error_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

# Options shared by commands (prune and eval will reuse them).
ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Model reference: bundled name (smollm2-135m), local Hugging Face folder, .gguf file, "
        "or hub id org/name[@revision]. See `alps models`.",
    ),
]
DataDirOption = Annotated[
    Optional[Path],
    typer.Option(
        "--data-dir",
        help="Local data root laid out like shared/data (default: $ALPS_DATA_DIR; if neither is set, "
        "data sets load from the Hugging Face hub).",
        show_default=False,
    ),
]
DtypeOption = Annotated[str, typer.Option("--dtype", help="Model dtype: float32, bfloat16 or float16.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N.")]
ThreadsOption = Annotated[
    Optional[int],
    typer.Option("--threads", min=1, help="CPU threads for torch (default: torch's choice).", show_default=False),
]
TrustRemoteCodeOption = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow model code from the hub (off unless asked).")
]
OutputOption = Annotated[
    Optional[Path],
    typer.Option("--output", "-o", help="Write the results as JSON to this file (atomic write).", show_default=False),
]


def split_names(value: str) -> list[str]:
    """A comma-separated option (``wikitext2,ptb``) as a list of names, blanks dropped."""
    return [name.strip() for name in value.split(",") if name.strip()]


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (values as JSON where they parse, else strings); ``a.b=1`` nests."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SettingError("--config", pair, "expected key=value", "e.g. --config max_iter=100")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = overrides
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return overrides


def reports_user_errors(command: F) -> F:
    """Print an AlpsError (field, value, problem, fix) in red and exit with status 2, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except AlpsError as error:
            error_console.print(f"[bold red]Error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from error

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """One-shot LLM pruning with ALPS (ADMM + PCG) as a Prefect pipeline tracked in MLflow."""
    logging.basicConfig(
        level=log_level.upper(),
        format="%(message)s",
        handlers=[RichHandler(console=error_console, show_path=False)],
        force=True,
    )
    # HTTP clients log every request at INFO (Prefect's API calls): noise for a user.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


@app.command("models")
@reports_user_errors
def models_command() -> None:
    """List the bundled models and the other kinds of model reference that load."""
    from .models import ACCEPTED_REFERENCES, BUNDLED_MODELS, describe_bundled_models
    from .storage import CACHE_DIR_ENV, cache_root

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
    from .data import DATA_DIR_ENV, describe_datasets, resolve_data_root

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
def ppl_command(
    model: ModelOption = "smollm2-135m",
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
    output: OutputOption = None,
    threads: ThreadsOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Measure the perplexity of a model on text data sets (papers' protocol) and print a table."""
    from .data import DATASETS, DatasetKind, check_seqlen, dataset_spec, resolve_data_root
    from .errors import SettingError
    from .models import load_model, resolve_model
    from .perplexity import evaluate_perplexity
    from .storage import atomic_write_json

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
                "environment": _environment(),
            },
        )
        console.print(f"Wrote {output}")


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _environment() -> dict[str, str]:
    import torch
    import transformers

    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": str(torch.get_num_threads()),
    }


# Commands defined in their own modules register on ``app`` when imported (after ``app`` exists).
from . import cli_prune  # noqa: E402,F401
from . import cli_eval  # noqa: E402,F401
from . import cli_sweep  # noqa: E402,F401
