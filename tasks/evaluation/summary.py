"""What an evaluation hands back: the headline numbers of one model, and where the full record is tracked."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["EvaluationSummary"]


class EvaluationSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_id: str  # the MLflow run holding every metric and artifact
    model: str
    perplexity: dict[str, float]  # data set -> perplexity
    accuracy: dict[str, float]  # lm-eval task -> headline accuracy
    limit: int | None  # lm-eval items per task (None: every item)
    seconds: float
