"""The Typer app every command registers on (exported as ``flows.cli.app``), its logging set-up, and what the
commands share: printing a user error without a traceback, comma-separated and ``key=value`` options, and the
environment record."""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

from tasks.common.errors import AlpsError, SettingError

__all__ = ["app", "console", "environment", "error_console", "method_overrides", "parse_overrides",
           "reports_user_errors", "split_names"]

app = typer.Typer(
    name="alps",
    help="One-shot LLM pruning with ALPS: prune, evaluate, sweep, and list models, data and tracked runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()
error_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

# Defaults for the libraries' own settings, unless the environment sets them: no telemetry look-ups (offline
# they fail, and Prefect's prints a traceback from its temporary server), and time for that server to start
# on a busy machine (Prefect's 20 s is too tight on two cores).
LIBRARY_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


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


def method_overrides(pairs: list[str], methods: list[str]) -> dict[str, Any]:
    """``--config`` pairs as a method-config dict, checked against the config of each of ``methods``."""
    from alps_solver import make_config, method_names

    overrides = parse_overrides(pairs)
    for method in methods:
        if overrides and method in method_names():  # an unknown method is reported by its own option
            try:
                make_config(method, overrides)
            except ValueError as error:
                raise SettingError("--config", " ".join(pairs), f"for {method}: {error}".rstrip("."),
                                   "see the method's fields in the message, or drop the setting") from None
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


def environment() -> dict[str, str]:
    """Versions and settings a results file records beside its numbers."""
    import torch
    import transformers

    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": str(torch.get_num_threads()),
    }


@app.callback()
def main(
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """One-shot LLM pruning with ALPS (ADMM + PCG) as a Prefect pipeline tracked in MLflow."""
    for name, value in LIBRARY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    logging.basicConfig(
        level=log_level.upper(),
        format="%(message)s",
        handlers=[RichHandler(console=error_console, show_path=False)],
        force=True,
    )
    # HTTP clients log every request at INFO (Prefect's API calls): noise for a user.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
