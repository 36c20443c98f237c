"""``alps track``: log a pruned folder's saved record to MLflow, for a run whose tracking failed or was optional;
and how every command says that a finished run is not (fully) tracked (exit status 3 when tracking is required)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .base import app, console, error_console, reports_user_errors

__all__ = ["TRACKING_FAILED_EXIT", "report_tracking", "track_command"]

TRACKING_FAILED_EXIT = 3  # the work is done and saved, but required tracking failed: a scheduler must notice


def report_tracking(mode: str, *problems: str | None) -> None:
    """Say why a finished run is not (fully) tracked, and where its record is: with tracking ``required`` in red,
    then exit with status 3; with ``optional`` as a warning. Nothing when every problem is None."""
    problems = tuple(problem for problem in problems if problem)
    label = "[bold red]Tracking failed:[/]" if mode == "required" else "[bold yellow]Not tracked:[/]"
    for problem in problems:
        error_console.print(f"{label} {problem}", highlight=False, soft_wrap=True)
    if problems and mode == "required":
        raise typer.Exit(code=TRACKING_FAILED_EXIT)


@app.command("track")
@reports_user_errors
def track_command(
    folder: Annotated[Path, typer.Argument(help="A pruned folder, as `alps prune` wrote it.", show_default=False)],
    experiment: Annotated[Optional[str], typer.Option(
        "--experiment", help="MLflow experiment (default: the one the run was to be tracked in).",
        show_default=False)] = None,
) -> None:
    """Log a pruned folder's record (prune_report.json, and evaluation.json when present) as a new MLflow run."""
    from tasks.tracking import runs as tracking

    run_id = tracking.log_pruned_folder(folder, experiment)
    report_tracking("required", tracking.tracking_problem(run_id))
    console.print(f"MLflow run {run_id} holds the record of {folder} (see `alps runs`): {tracking.run_url(run_id)}")
