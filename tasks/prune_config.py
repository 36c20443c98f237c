"""The pruning flow's parameters as one validated object (pydantic at the boundary, per the style guide)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from alps_solver import SparsityPattern, make_config, method_names
from alps_solver.config import config_to_dict

__all__ = ["PruneConfig", "PIPELINE_VERSION", "stable_hash"]

# Bump when a change to capture, block solving or reassembly changes results: it is part of every cache key.
PIPELINE_VERSION = 1


class PruneConfig(BaseModel):
    """Everything that decides a pruning run's result, plus where it reads and writes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("smollm2-135m", description="bundled name, local folder, .gguf file or hub id[@revision]")
    method: str = Field("alps", description="solver method: " + ", ".join(method_names()))
    method_config: dict[str, Any] = Field(default_factory=dict, description="overrides of the method's config")
    pattern: str = Field("0.7", description="'0.7' (unstructured), '2:4', 'rows:0.7' or 'channels:0.5'")
    calibration: str = Field("c4", description="calibration data set (c4, wikitext2, pydoc, ...)")
    nsamples: int = Field(128, ge=1, description="calibration windows")
    seqlen: int = Field(2048, ge=2, description="tokens per window (capped by the model's context)")
    seed: int = 0
    device: str = Field("auto", description="auto (cuda when present, else cpu), cpu, cuda, cuda:N")
    true_sequential: bool = Field(False, description="solve each layer group on inputs of the pruned groups before it")
    gram_dtype: Literal["float32", "float64"] = "float32"
    batch_size: int = Field(8, ge=1, description="calibration samples per block forward")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice); on a "
                                "loaded 2-core machine 1 can be many times faster than 2")
    task_runner: Literal["threads", "dask", "ray"] = Field(
        "threads", description="Prefect task runner for the layer solves of a block: thread pool, Dask or Ray")
    solve_workers: int = Field(1, ge=1, description="layer solves run at once (1: in the block's own process)")
    runner_address: str | None = Field(None, description="an existing Dask scheduler or Ray cluster address")
    output: Path = Field(Path("out"), description="folder for the pruned model (save_pretrained layout)")
    overwrite: bool = False
    cache_dir: Path | None = Field(None, description="task results and activations; default $ALPS_CACHE_DIR/runs")
    data_dir: Path | None = Field(None, description="local data root; default $ALPS_DATA_DIR")
    keep_activations: bool = Field(False, description="keep every block's calibration activations after success")
    evaluate: bool = Field(True, description="evaluate the pruned model at the end (into the same MLflow run)")
    eval_ppl: list[str] | None = Field(None, description="perplexity data sets; default: the calibration data "
                                       "set's own evaluation text (so a run needs no other data)")
    eval_tasks: list[str] = Field(default_factory=list, description="lm-eval tasks, e.g. piqa, arc_easy")
    eval_limit: int | None = Field(None, ge=1, description="items per lm-eval task")
    eval_max_windows: int | None = Field(None, ge=1, description="score only the first N perplexity windows")
    eval_seqlen: int = Field(2048, ge=2, description="perplexity window (capped by the model's context)")
    experiment: str = Field("alps", description="MLflow experiment")
    log_model: bool = Field(False, description="copy the pruned folder into the MLflow run (else its path)")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        return str(SparsityPattern.parse(value))

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value not in method_names():
            raise ValueError(f"method={value!r} is unknown; choose one of {', '.join(method_names())}")
        return value

    @model_validator(mode="after")
    def _method_config(self) -> PruneConfig:
        make_config(self.method, self.method_config)  # raises ValueError naming a bad field
        if self.evaluate:
            self.evaluation(str(self.output))  # bad data set or task names fail now, not after pruning
        return self

    @property
    def sparsity_pattern(self) -> SparsityPattern:
        return SparsityPattern.parse(self.pattern)

    def evaluation(self, model_folder: str):
        """The evaluation of the pruned folder this run asks for."""
        from .evaluation import EvaluateConfig

        return EvaluateConfig(
            model=model_folder, perplexity=self.eval_ppl if self.eval_ppl is not None else [self.calibration],
            tasks=self.eval_tasks, limit=self.eval_limit, max_windows=self.eval_max_windows, seqlen=self.eval_seqlen,
            device=self.device, threads=self.threads, data_dir=self.data_dir, experiment=self.experiment,
            log_model=self.log_model,
        )

    def solver_config(self) -> dict[str, Any]:
        """The method's full config (defaults filled in), as the cache keys see it."""
        return config_to_dict(make_config(self.method, self.method_config))


def stable_hash(*parts: Any) -> str:
    """Short sha256 of JSON-serialisable parts, for cache keys and folder names."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]
