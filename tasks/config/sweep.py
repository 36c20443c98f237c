"""The sweep flow's settings: one model, every (method, pattern), shared calibration and runtime settings.

``SweepConfig.plan()`` turns it into one ``PruneConfig`` per configuration, method-major, each writing to
``output/<method>-<pattern>`` and sharing one cache folder, so the calibration inputs (whose cache key holds
the model and the calibration settings but not the method or pattern) are captured once.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from alps_solver import SparsityPattern, make_config

from .defaults import DEFAULT_EXPERIMENT, DEFAULT_MODEL, DEFAULT_TRACKING, TRACKING_HELP, TrackingMode
from .evaluate import EvaluationSpec
from .prune import CalibrationConfig, OutputConfig, Pattern, PruneConfig, RuntimeConfig, SolverOptions, SolverSpec

__all__ = ["SweepConfig", "configuration_folder"]


def configuration_folder(method: str, pattern: SparsityPattern) -> str:
    """Subfolder name of one configuration's output: ``alps-0.7``, ``alps-2_4``, ``wanda-rows_0.7``."""
    return f"{method}-{str(pattern).replace(':', '_')}"


class SweepConfig(BaseModel):
    """Prune one model with every method at every pattern; the other settings are shared."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(DEFAULT_MODEL, description="bundled name, local folder, .gguf file or hub id[@revision]")
    methods: list[str] = Field(["alps", "sparsegpt", "wanda"], min_length=1, description="solver methods")
    patterns: list[Pattern] = Field([SparsityPattern.unstructured(0.5), SparsityPattern.unstructured(0.7),
                                     SparsityPattern.n_m(2, 4)], min_length=1, description="sparsity patterns")
    solver: SolverOptions = SolverOptions()
    # Small calibration by default, so that a sweep of every method at every pattern on a CPU takes an hour or so.
    calibration: CalibrationConfig = CalibrationConfig(dataset="pydoc", nsamples=16, seqlen=512)
    runtime: RuntimeConfig = RuntimeConfig()
    output: Path = Field(Path("out/sweep"), description="folder of the sweep: one subfolder per configuration, "
                         "the summary and the plot")
    evaluation: EvaluationSpec | None = Field(None, description="what to measure on every pruned model; None: "
                                              "nothing")
    concurrency: int = Field(1, ge=1, description="configurations run at a time after the first (which captures "
                             "the calibration inputs the others reuse)")
    track: bool = Field(False, description="an MLflow parent run with one child run per configuration")
    experiment: str = Field(DEFAULT_EXPERIMENT, description="MLflow experiment")
    tracking: TrackingMode = Field(DEFAULT_TRACKING, description=TRACKING_HELP)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, names: list[str]) -> list[str]:
        for name in names:
            make_config(name)  # the solver's own check: an unknown method raises ValueError listing the known ones
        return names

    @model_validator(mode="after")
    def _every_configuration_builds(self) -> SweepConfig:
        self.plan()  # a bad combination (e.g. a method setting one method lacks) fails now, not mid-sweep
        return self

    def plan(self) -> list[PruneConfig]:
        """One PruneConfig per (method, pattern), method-major. Each keeps the calibration inputs after it ends,
        so the later ones reuse the first one's capture (the sweep releases what it created at the end), and
        owns its folder: a rerun (the next night) replaces it."""
        runtime = self.runtime.model_copy(update={"keep_calibration": True})
        return [
            PruneConfig(
                model=self.model,
                solver=SolverSpec(method=method, pattern=pattern, **self.solver.model_dump()),
                calibration=self.calibration,
                runtime=runtime,
                output=OutputConfig(folder=self.output / configuration_folder(method, pattern), overwrite=True,
                                    experiment=self.experiment, tracking=self.tracking),
                evaluation=self.evaluation,
            )
            for method in self.methods
            for pattern in self.patterns
        ]
