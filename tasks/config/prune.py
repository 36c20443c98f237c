"""The pruning flow's settings: one validated object in parts, every default written once, here.

    PruneConfig
      model         what to prune: a bundled name, a local folder, a .gguf file or a hub id
      solver        SolverSpec: method, pattern, method_config, true_sequential, gram_dtype, targets, target_mix,
                    allocation, refine (the solved weights)
      calibration   CalibrationConfig: dataset, nsamples, seqlen, seed (the inputs the solver sees)
      runtime       RuntimeConfig: where and how it runs (device, threads, workers, cache and data folders)
      output        OutputConfig: the pruned folder, the MLflow experiment it is tracked in, and whether
                    tracking is required
      evaluation    EvaluationSpec or None: what to measure on the pruned model at the end

The command line, the deployments (``deployments/prefect.yaml``) and the sweep take their defaults from
these classes. A value the user typed is parsed once, here: the pattern travels as a ``SparsityPattern``
and the method's settings are checked against its solver config. Pydantic lives at this boundary only; the solver
keeps its own dataclasses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from alps_solver import PatternKind, SparsityPattern, make_config, method_names
from alps_solver.methods import reads_inputs, supported_kinds

from ..common.files import cache_root
from . import fields
from .defaults import DEFAULT_EXPERIMENT, DEFAULT_MODEL, DEFAULT_TRACKING, TRACKING_HELP, TrackingMode
from .evaluate import EvaluateConfig, EvaluationSpec
from .structure import Structure

__all__ = [
    "AllocationSpec",
    "CalibrationConfig",
    "OutputConfig",
    "Pattern",
    "PruneConfig",
    "RefineSpec",
    "RuntimeConfig",
    "SolverOptions",
    "SolverSpec",
]

# With dense targets, the dense model's share of each layer's target output. On the bundled model at 70%
# (bench/quality_bench.py, bench/README.md) fully dense targets (1) overfit the drifted inputs, while a share
# of about a fifth lowers plain ALPS's perplexity by about a fifth.
TARGET_MIX = 0.2
# The error allocation's unit: at 70% (bench/quality_bench.py, bench/README.md) each layer's own sparsity with
# every block at the target took about a fifth off ALPS's WikiText-2 perplexity, free layers 6%, whole blocks
# made it far worse. And the sparsities at which it measures each layer's error: this many, spanning target
# +- lambda.
ALLOCATION_GRANULARITY, ERROR_POINTS = "layer-in-block", 5

# Block refinement's defaults (bench/quality_bench.py at 70%, bench/README.md): one epoch at two windows per
# step takes about a fifth off ALPS's perplexity and adds about two thirds to its run time.
REFINE_EPOCHS, REFINE_LR, REFINE_BATCH = 1, 2e-4, 2

# A sparsity pattern as a field: parsed from its text form ('0.7', '2:4', 'rows:0.7', 'channels:0.5') on the
# way in, written back as that text on the way out (JSON, Prefect parameters, MLflow, the prune report).
Pattern = Annotated[
    SparsityPattern,
    PlainValidator(SparsityPattern.parse),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "examples": ["0.7", "2:4", "rows:0.7", "channels:0.5"]}),
]

# A structure as a field: 'mlp:0.3,heads:0.25' in, the same text out (tasks/config/structure.py).
Structured = Annotated[
    Structure,
    PlainValidator(Structure.parse),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "examples": ["mlp:0.3", "mlp:0.3,heads:0.25"]}),
]


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AllocationSpec(_Settings):
    """How the target sparsity is spread over the blocks: the same everywhere (uniform), OWL's outlier-weighted
    allocation (Yin et al. 2023: blocks with more outliers in |W| ||x|| keep more weights), or error-driven
    (each layer's SparseGPT error against sparsity on the dense model: the sparsity goes where it costs least).
    The overall sparsity of the decoder linears is the target either way, to the weight."""

    method: Literal["uniform", "owl", "error"] = Field("uniform", description="uniform, owl (outlier-weighted) "
                                                       "or error (error-driven)")
    spread: float = Field(0.08, ge=0.0, lt=1.0, description="lambda: the sparsities lie within about this much "
                          "of the target, either way")
    outlier_threshold: float = Field(5.0, gt=0.0, description="OWL's M: a weight is an outlier when its |W| ||x|| "
                                     "exceeds M times its block's mean")
    granularity: Literal["layer", "block", "layer-in-block"] = Field(
        ALLOCATION_GRANULARITY, description="what the error allocation gives a sparsity of its own: each layer, "
        "each block (its layers alike), or each layer with every block at the target (layer-in-block)")
    min_sparsity: float = Field(0.0, ge=0.0, lt=1.0, description="the least sparsity any layer may get")
    max_sparsity: float = Field(0.99, gt=0.0, lt=1.0, description="the most sparsity any layer may get")

    def error_grid(self, target: float) -> list[float]:
        """The sparsities at which the error allocation measures each layer: target +- lambda, within the bounds."""
        low, high = max(target - self.spread, self.min_sparsity), min(target + self.spread, self.max_sparsity)
        if high <= low:
            return [target]
        return [low + (high - low) * i / (ERROR_POINTS - 1) for i in range(ERROR_POINTS)]

    @field_validator("granularity")
    @classmethod
    def _granularity_needs_error(cls, value: str, info: ValidationInfo) -> str:
        method = info.data.get("method")
        if method is not None and method != "error" and value != ALLOCATION_GRANULARITY:
            raise ValueError(f"granularity {value} chooses what the error allocation spreads over, and allocation "
                             f"{method} does not: add method 'error' (--allocation error), or leave it out")
        return value

    @field_validator("max_sparsity")
    @classmethod
    def _ordered_bounds(cls, high: float, info: ValidationInfo) -> float:
        low = info.data.get("min_sparsity")
        if low is not None and high < low:
            raise ValueError(f"max_sparsity {high} is below min_sparsity {low}: give bounds low,high with low <= high")
        return high


class RefineSpec(_Settings):
    """Block refinement after a block's layers are solved: their kept weights tuned together (masks fixed) by
    Adam so the block's output matches the dense block's on the calibration inputs (tasks/blockwise/refine.py)."""

    method: Literal["none", "adam"] = Field("none", description="none, or adam")
    epochs: int = Field(REFINE_EPOCHS, ge=1, description="passes over the calibration windows")
    lr: float = Field(REFINE_LR, gt=0.0, lt=1.0, description="Adam's learning rate")
    batch: int = Field(REFINE_BATCH, ge=1, description="calibration windows per step")

    @model_validator(mode="after")
    def _settings_need_a_method(self) -> RefineSpec:
        fields = type(self).model_fields
        changed = [name for name in ("epochs", "lr", "batch") if getattr(self, name) != fields[name].default]
        if self.method == "none" and changed:
            raise ValueError(f"refine {', '.join(changed)} given without a refinement method: add method 'adam' "
                             "(--refine adam), or leave them out")
        return self


class SolverOptions(_Settings):
    """How every layer is solved, apart from the method and pattern (a sweep shares these)."""

    method_config: dict[str, Any] = Field(default_factory=dict, description="overrides of the method's config, "
                                          "e.g. {'max_iter': 100, 'schedule': {'rho_init': 0.3}}")
    true_sequential: bool = Field(False, description="solve each layer group on the inputs the pruned groups "
                                  "before it produce")
    gram_dtype: Literal["float32", "float64"] = Field("float32", description="dtype of each batch's X^T X "
                                                      "(summed in float64 either way)")
    targets: Literal["layer", "dense"] = Field("layer", description="what each layer's pruned output is fitted "
                                               "to: 'layer', the dense layer's output on the pruned model's inputs "
                                               "(SparseGPT, ALPS); 'dense', the dense model's output, which also "
                                               "corrects the error of the blocks and layers before it (twice the "
                                               "activations on disk)")
    target_mix: float = Field(TARGET_MIX, gt=0.0, le=1.0, description="with dense targets, the dense model's "
                              "share a of each layer's target output: (1 - a) x the layer's own dense output + "
                              "a x the dense model's (1: the dense model's alone)")
    allocation: AllocationSpec = Field(AllocationSpec(), description="how the sparsity is spread over the blocks")
    refine: RefineSpec = Field(RefineSpec(), description="block refinement after each block's layers are solved")

    @field_validator("target_mix")
    @classmethod
    def _mix_needs_dense_targets(cls, value: float, info: ValidationInfo) -> float:
        if info.data.get("targets") == "layer" and value != TARGET_MIX:  # targets is validated first
            raise ValueError(f"target_mix {value} mixes the dense model's output into each layer's target, which "
                             "only dense targets have: add targets 'dense', or leave target_mix out")
        return value


class SolverSpec(SolverOptions):
    """Everything that decides a block's solved weights, given its inputs."""

    method: str = Field("alps", description="solver method: " + ", ".join(method_names()))
    pattern: Pattern = Field(SparsityPattern.unstructured(0.7), description="'0.7' (unstructured), '2:4', "
                             "'rows:0.7' or 'channels:0.5'")
    structured: Structured | None = Field(None, description="structured pruning that shrinks the model instead of "
                                          "a pattern: 'mlp:0.3' removes 30% of each block's MLP neurons, "
                                          "'heads:0.25' a quarter of its attention heads, 'mlp:0.3,heads:0.25' both")

    @field_validator("pattern")
    @classmethod
    def _allocated_pattern(cls, pattern: SparsityPattern, info: ValidationInfo) -> SparsityPattern:
        allocation = info.data.get("allocation")
        if allocation is None or allocation.method == "uniform":
            return pattern
        if pattern.kind is not PatternKind.UNSTRUCTURED:
            raise ValueError(f"allocation {allocation.method} spreads an unstructured sparsity over the blocks, and "
                             f"{pattern} fixes every layer's pattern: give a fraction (e.g. 0.7), or allocation "
                             "uniform")
        if not allocation.min_sparsity <= pattern.sparsity <= allocation.max_sparsity:
            raise ValueError(f"sparsity {pattern.sparsity} lies outside the allocation's bounds "
                             f"[{allocation.min_sparsity}, {allocation.max_sparsity}]: the layers could not average "
                             "it; widen the bounds")
        return pattern

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str, info: ValidationInfo) -> str:
        make_config(value)  # the solver's own check: an unknown method raises ValueError listing the known ones
        if info.data.get("targets") == "dense" and not reads_inputs(value):  # targets is validated first
            raise ValueError(f"{value} sees the weights alone, and dense targets need a method that reads the "
                             "calibration inputs: use another method (alps, sparsegpt, wanda, ...), or targets "
                             "'layer'")
        return value

    @model_validator(mode="after")
    def _valid_method_config(self) -> SolverSpec:
        make_config(self.method, self.method_config)  # a bad field raises ValueError naming it
        return self

    @model_validator(mode="after")
    def _structure_alone(self) -> SolverSpec:
        if self.structured is None:
            return self
        if "pattern" in self.model_fields_set:
            raise ValueError(f"structured {self.structured} and pattern {self.pattern} both given: structured pruning "
                             "removes whole neurons and heads instead of a pattern; give one of them")
        if self.allocation.method != "uniform":
            raise ValueError(f"structured {self.structured} removes the same share of every block, and allocation "
                             f"{self.allocation.method} spreads a sparsity over them: leave the allocation uniform")
        needed = {PatternKind.INPUT_CHANNELS: self.structured.mlp, PatternKind.CHANNEL_GROUPS: self.structured.heads}
        missing = [kind.value for kind, share in needed.items() if share and kind not in supported_kinds(self.method)]
        if missing:
            raise ValueError(f"{self.method} cannot remove {'heads' if 'channel_groups' in missing else 'neurons'} "
                             f"(it cannot produce {', '.join(missing)} patterns): use alps, alps-simple, magnitude, "
                             "wanda or wanda-ls")
        return self

    @property
    def solver_config(self) -> Any:
        """The method's frozen config: its defaults (and preset) with ``method_config`` on top."""
        return make_config(self.method, self.method_config)


class CalibrationConfig(_Settings):
    """The calibration data: which text, how many windows of how many tokens, drawn with which seed."""

    dataset: str = Field("c4", description="calibration data set (c4, wikitext2, pydoc, ...)")
    nsamples: int = Field(128, ge=1, description="calibration windows")
    seqlen: int = Field(2048, ge=2, description="tokens per window (capped by the model's context)")
    seed: int = Field(0, description="seed of the window draws")
    # bfloat16 by default: on the bundled model (ALPS at 70% and 2:4, bench/activation_dtype_bench.py) its
    # perplexities are within the rounding spread of float32's, at half the activations' disk and memory.
    activation_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="dtype the block inputs and outputs are stored and kept in (the block math and H "
        "stay float32/float64); float32 doubles the activations' disk and memory")

    _known_dataset = field_validator("dataset")(fields.calibration_dataset)


class RuntimeConfig(_Settings):
    """Where and how a run executes; none of it is part of the cache keys. The device, ``batch_size`` and
    thread counts change the solved weights only through float rounding (the order of sums)."""

    device: str = Field("auto", description="auto (cuda when present, else cpu), cpu, cuda, cuda:N")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice); on a loaded "
                                "2-core machine 1 can be many times faster than 2")
    batch_size: int = Field(8, ge=1, description="calibration samples per block forward")
    task_runner: Literal["threads", "dask", "ray"] = Field("threads", description="Prefect task runner for the "
                                                           "layer solves of a block: thread pool, Dask or Ray")
    solve_workers: int = Field(1, ge=1, description="layer solves run at once (1: in the block's own process)")
    runner_address: str | None = Field(None, description="an existing Dask scheduler or Ray cluster address")
    cache_dir: Path | None = Field(None, description="the run's cache folder (task results, block weights, "
                                   "activations); default $ALPS_CACHE_DIR/runs")
    data_dir: Path | None = Field(None, description="local data root; default $ALPS_DATA_DIR, else the hub")
    keep_activations: bool = Field(False, description="keep every block boundary's activations, during and after "
                                   "the run (the most disk; a rerun then replays nothing)")
    keep_calibration: bool = Field(False, description="keep the calibration inputs after the run (a sweep's "
                                   "configurations share them; the sweep deletes them at its end)")
    keep_every: int = Field(0, ge=0, description="also keep every K-th block boundary's activations while the run "
                            "goes on, so a resume replays at most K blocks (0: only the current block's inputs "
                            "and outputs, the least disk)")
    offload_activations: bool = Field(False, description="keep the block inputs and outputs in host memory and "
                                      "move one batch at a time to the device (less GPU memory)")
    check_resources: bool = Field(True, description="refuse, before any work, a run whose resource plan does not "
                                  "fit the free disk, RAM or device memory")

    _known_device = field_validator("device")(fields.device)

    @field_validator("runner_address")
    @classmethod
    def _address_of_a_cluster(cls, address: str | None, info: ValidationInfo) -> str | None:
        if address is not None and info.data.get("task_runner") == "threads":
            raise ValueError("an address is for an existing Dask scheduler or Ray cluster, and the threads task "
                             "runner has none: choose the dask or ray task runner, or give no address")
        return address

    def resolved_cache_dir(self) -> Path:
        """``cache_dir``, or its default under the cache root, as an absolute path."""
        return Path(self.cache_dir or cache_root() / "runs").expanduser().resolve()


class OutputConfig(_Settings):
    """Where the pruned model goes and where the run is tracked."""

    folder: Path = Field(Path("out"), description="folder for the pruned model (save_pretrained layout)")
    overwrite: bool = Field(False, description="replace a non-empty folder once the new model is complete")
    experiment: str = Field(DEFAULT_EXPERIMENT, min_length=1, description="MLflow experiment")
    log_model: bool = Field(False, description="copy the pruned folder into the MLflow run (else its path)")
    tracking: TrackingMode = Field(DEFAULT_TRACKING, description=TRACKING_HELP)


class PruneConfig(_Settings):
    """Everything that decides a pruning run's result, plus where it reads and writes."""

    model: str = Field(DEFAULT_MODEL, description="bundled name, local folder, .gguf file or hub id[@revision]")
    solver: SolverSpec = SolverSpec()
    calibration: CalibrationConfig = CalibrationConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    output: OutputConfig = OutputConfig()
    evaluation: EvaluationSpec | None = Field(EvaluationSpec(), description="what to measure on the pruned "
                                              "model (into the same MLflow run); None skips the evaluation")

    def evaluate_config(self, model_folder: Path) -> EvaluateConfig:
        """The evaluation of the pruned folder that ``evaluation`` asks for, on this run's device and data."""
        spec = self.evaluation or EvaluationSpec()
        measures = spec.model_dump(exclude={"perplexity"})
        return EvaluateConfig(
            **measures, model=str(model_folder),
            perplexity=spec.perplexity if spec.perplexity is not None else [self.calibration.dataset],
            device=self.runtime.device, threads=self.runtime.threads, data_dir=self.runtime.data_dir,
            experiment=self.output.experiment, log_model=self.output.log_model, tracking=self.output.tracking,
        )
