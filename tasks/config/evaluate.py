"""The evaluation settings: what to measure (``EvaluationSpec``, also the evaluation a prune run ends with)
and, for the evaluation flow, of which model and where (``EvaluateConfig``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..common.files import PRUNE_REPORT_FILE
from ..evaluation.lm_eval_tasks import ZERO_SHOT_TASKS, unknown_task
from . import fields
from .defaults import DEFAULT_EXPERIMENT, DEFAULT_MODEL, DEFAULT_TRACKING, TRACKING_HELP, TrackingMode

__all__ = ["EvaluateConfig", "EvaluationSpec"]


class EvaluationSpec(BaseModel):
    """What to measure: perplexity on text data sets, accuracy on lm-eval tasks, and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    perplexity: list[str] | None = Field(None, description="text data sets for perplexity; in a prune run, None is "
                                         "the calibration data set's own evaluation text (needing no other data)")
    tasks: list[str] = Field(default_factory=list, description="lm-eval tasks: " + ", ".join(ZERO_SHOT_TASKS))
    limit: int | None = Field(None, ge=1, description="items per lm-eval task (MMLU: per subject); all if unset")
    seqlen: int = Field(2048, ge=2, description="perplexity window (capped by the model's context)")
    max_windows: int | None = Field(None, ge=1, description="score only the first N perplexity windows")
    ppl_batch_size: int = Field(1, ge=1, description="perplexity windows per forward pass")
    batch_size: int = Field(8, ge=1, description="lm-eval batch size")

    _text_data_sets = field_validator("perplexity")(fields.text_datasets)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, names: list[str]) -> list[str]:
        name = unknown_task(names)
        if name is not None:
            raise ValueError(f"{name!r} is an unknown zero-shot task; use {', '.join(ZERO_SHOT_TASKS)}")
        return names


class EvaluateConfig(EvaluationSpec):
    """The evaluation flow's parameters: one model, what to measure on it, where, and where it is tracked."""

    model: str = Field(DEFAULT_MODEL, description="bundled name, local folder, .gguf file or hub id[@revision]")
    perplexity: list[str] = Field(["wikitext2"], description="text data sets for perplexity")
    dtype: Literal["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] = Field(
        "float32", description="dtype the model is loaded in")
    device: str = Field("auto", description="auto (cuda when present, else cpu), cpu, cuda, cuda:N")
    threads: int | None = Field(None, ge=1, description="torch CPU threads")
    data_dir: Path | None = Field(None, description="local data root; default $ALPS_DATA_DIR, else the hub")
    prune_report: Path | None = Field(None, description="prune_report.json to log; default: the model folder's")
    log_model: bool = Field(False, description="copy the model folder into the MLflow run (else record its path)")
    experiment: str = Field(DEFAULT_EXPERIMENT, min_length=1, description="MLflow experiment")
    tracking: TrackingMode = Field(DEFAULT_TRACKING, description=TRACKING_HELP)
    trust_remote_code: bool = False

    _known_device = field_validator("device")(fields.device)

    def report_path(self) -> Path | None:
        """The prune report to log: the one given, else ``prune_report.json`` in a local model folder."""
        if self.prune_report is not None:
            return self.prune_report
        candidate = Path(self.model).expanduser() / PRUNE_REPORT_FILE
        return candidate if candidate.is_file() else None
