"""The Prefect tasks of the sweep flow (``flows/sweep.py``): the summary artifact and files."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from .orchestration import run_logger, task
from .tracking.sweeps import ConfigurationRow, SweepSummary, summary_table, write_summary

__all__ = ["SweepFailed", "summarize_sweep"]

logger = logging.getLogger(__name__)

SUMMARY_ARTIFACT = "sweep-summary"


class SweepFailed(RuntimeError):
    """One or more configurations of a sweep failed (the others finished and are in the summary)."""


@task(name="summarize-sweep", cache_policy=NO_CACHE)
def summarize_sweep(model: str, rows: list[ConfigurationRow], output: Path) -> SweepSummary:
    """The summary table artifact (``sweep-summary``), ``sweep_summary.json`` and the plot in ``output``."""
    summary = write_summary(model, rows, output)
    create_table_artifact(table=summary_table(rows), key=SUMMARY_ARTIFACT,
                          description=f"Sweep of {model}: {len(rows)} configurations, outputs under {summary.output}")
    run_logger(logger).info("sweep of %s: %d configurations (%d failed); summary in %s", model, len(rows),
                            len(summary.failed), summary.output)
    return summary
