"""The Prefect tasks of the sweep flow (``flows/sweep.py``): the summary artifact and files, and releasing the
calibration activations the sweep created.

Every configuration of a sweep shares one cache folder, so the calibration inputs are captured once and
reused; for that the configurations keep their activations, and the sweep deletes the activation files it
created at the end.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from .blockwise.steps import ACTIVATIONS
from .orchestration import run_logger, task
from .tracking.sweeps import ConfigurationRow, SweepSummary, summary_table, write_summary

__all__ = ["SweepFailed", "activation_files", "release_new_activations", "summarize_sweep"]

logger = logging.getLogger(__name__)

SUMMARY_ARTIFACT = "sweep-summary"


class SweepFailed(RuntimeError):
    """One or more configurations of a sweep failed (the others finished and are in the summary)."""


def activation_files(cache_dir: Path) -> set[Path]:
    """The activation files in a cache folder now."""
    return set((Path(cache_dir) / ACTIVATIONS).glob("*.safetensors"))


@task(name="release-sweep-activations", cache_policy=NO_CACHE)
def release_new_activations(cache_dir: Path, before: set[Path]) -> int:
    """Delete the activation files that appeared in ``cache_dir`` during the sweep (cached results stay valid:
    a later run whose inputs are gone recomputes them)."""
    created = activation_files(cache_dir) - set(before)
    for path in created:
        path.unlink(missing_ok=True)
    return len(created)


@task(name="summarize-sweep", cache_policy=NO_CACHE)
def summarize_sweep(model: str, rows: list[ConfigurationRow], output: Path) -> SweepSummary:
    """The summary table artifact (``sweep-summary``), ``sweep_summary.json`` and the plot in ``output``."""
    summary = write_summary(model, rows, output)
    create_table_artifact(table=summary_table(rows), key=SUMMARY_ARTIFACT,
                          description=f"Sweep of {model}: {len(rows)} configurations, outputs under {summary.output}")
    run_logger(logger).info("sweep of %s: %d configurations (%d failed); summary in %s", model, len(rows),
                            len(summary.failed), summary.output)
    return summary
