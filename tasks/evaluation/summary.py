"""What an evaluation hands back: the headline numbers of one model, and where the full record is tracked.

A prune run that ends with an evaluation also keeps the summary in the pruned folder (``evaluation.json``,
beside ``prune_report.json``), so the folder holds the run's whole record even when MLflow could not take it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ..common.files import atomic_write_json

__all__ = ["EVALUATION_FILE", "EvaluationSummary", "save_evaluation"]

EVALUATION_FILE = "evaluation.json"


class EvaluationSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_id: str | None  # the MLflow run holding every metric and artifact (None: not tracked)
    model: str
    perplexity: dict[str, float]  # data set -> perplexity
    accuracy: dict[str, float]  # lm-eval task -> headline accuracy
    limit: int | None  # lm-eval items per task (None: every item)
    seconds: float
    tracking_problem: str | None = None  # why the run is not (fully) tracked, None when it is


def save_evaluation(folder: Path, summary: EvaluationSummary) -> Path:
    """``evaluation.json`` in ``folder``, written atomically; returns its path."""
    return atomic_write_json(Path(folder) / EVALUATION_FILE, summary.model_dump(mode="json"))
