"""The Typer app every command registers on (exported as ``flows.cli.app``), its logging set-up, and what the
commands share: printing a user error without a traceback, comma-separated and ``key=value`` options, and the
environment record."""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import signal
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

from tasks.common.errors import AlpsError, SettingError
from tasks.common.files import storage_error

__all__ = ["app", "console", "environment", "error_console", "method_overrides", "parse_overrides",
           "reports_user_errors", "run_flow", "split_names", "stops_cleanly"]

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
    """Print an AlpsError (field, value, problem, fix) in red and exit with status 2, without a traceback; the
    same for a write that failed for lack of space or permission."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except AlpsError as error:
            error_console.print(f"[bold red]Error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from error
        except OSError as error:  # a write the pipeline does not wrap itself (a library's own file)
            storage = storage_error(error, error.filename or ".")
            if storage is None:
                raise
            error_console.print(f"[bold red]Error:[/] {storage}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from error

    return wrapper  # type: ignore[return-value]


def _without_user_error_traceback(record: logging.LogRecord) -> bool:
    """Keep a log record, without its traceback when its exception is a user error or a requested stop."""
    from tasks.common.stopping import Stopped

    if record.exc_info and isinstance(record.exc_info[1], (AlpsError, Stopped)):
        record.exc_info, record.exc_text = None, None
    return True


def stops_cleanly(command: F) -> F:
    """A long command that SIGTERM and SIGINT stop cleanly (``tasks.common.stopping``): the step in progress
    stops, temporary files and the processes the command started are removed, the MLflow run is marked
    KILLED, and the command exits with 143 (SIGTERM) or 130 (SIGINT), saying that the same command resumes."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from prefect.exceptions import TerminationSignal

        from tasks.common.stopping import Stopped, exit_code, stop_on_signals

        started = _child_pids()
        try:
            with stop_on_signals():
                return command(*args, **kwargs)
        except (Stopped, TerminationSignal, KeyboardInterrupt) as stop:
            # Prefect turns a SIGTERM inside a flow into TerminationSignal, then delivers it again to the
            # handler it replaced (ours), which raises Stopped.
            signum = getattr(stop, "signum", getattr(stop, "signal", signal.SIGINT))
            _stop_children(started)
            error_console.print(f"[bold yellow]Stopped[/] by {signal.Signals(signum).name}. Every finished step is "
                                "cached: run the same command again to resume.", highlight=False)
            raise typer.Exit(code=exit_code(signum)) from None

    return wrapper  # type: ignore[return-value]


def run_flow(flow: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a flow against the Prefect API (``tasks.local_api``): the user's server, or a temporary one that
    stops with the command, however it ends."""
    from tasks.local_api import local_api

    with local_api():
        return flow(*args, **kwargs)


def _child_pids() -> set[int]:
    import psutil

    return {child.pid for child in psutil.Process().children(recursive=True)}


def _stop_children(before: set[int], timeout: float = 10.0) -> None:
    """Stop the child processes started since ``before`` that are still running (a task runner's workers)."""
    import psutil

    children = [child for child in psutil.Process().children(recursive=True) if child.pid not in before]
    for child in children:
        child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        child.kill()


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
    # A user error raised inside a flow is printed once, as one line (reports_user_errors); Prefect's run
    # loggers would also print it with a traceback.
    for runs in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(runs).addFilter(_without_user_error_traceback)
    # HTTP clients log every request at INFO (Prefect's API calls): noise for a user.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
