"""The record of a pruning run, built from the flow's results in memory: written into the pruned folder as
``prune_report.json``, logged to MLflow, and handed back to whoever ran the flow.

``config`` is the run's ``PruneConfig`` as given, so ``PruneConfig.model_validate(report["config"])`` rebuilds
the run; ``solver_config`` is the method's full config with every default filled in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from ..config.prune import PruneConfig
from ..evaluation.summary import EvaluationSummary
from .chain import PIPELINE_VERSION
from .records import BlockResult, CalibrationResult, LayerReport, RefinementRecord

if TYPE_CHECKING:  # imported for annotations only: loading transformers is slow
    from ..model.prepared import PreparedModel
    from .allocation import Allocation

__all__ = ["BlockReport", "PruneReport", "PruneResult", "block_error_rows", "build_report"]


class ModelIdentity(BaseModel):
    model_config = ConfigDict(frozen=True)

    reference: str
    fingerprint: str
    model_type: str
    num_layers: int


class CalibrationRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    seqlen: int  # the window length used: the configured one, capped by the model's context
    tokens: int
    tokens_sha256: str


class BlockReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    index: int
    seconds: float
    memory: dict[str, float]
    cached: bool
    layers: list[LayerReport]
    refinement: RefinementRecord | None = None  # with block refinement: the block's output error before and after


class AllocationRecord(BaseModel):
    """How the sparsity was spread over the blocks (each layer's own is in its layer report)."""

    model_config = ConfigDict(frozen=True)

    method: str
    outlier_ratios: list[float]  # per block, on the dense model (OWL)
    block_sparsity: list[float]  # per block (its layers' weighted mean), before the rounding to whole weights
    seconds: float  # measuring on the dense model
    error_grid: list[float] = []  # error allocation: the sparsities each layer's error was measured at
    layer_errors: list[dict[str, list[float]]] = []  # per block: layer -> SparseGPT's relative error at error_grid


class PruneReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: ModelIdentity
    config: PruneConfig
    solver_config: dict[str, Any]
    calibration: CalibrationRecord
    pipeline_version: int
    result_key: str = ""  # the last block's cache key: it names this exact result (model, calibration, every solve)
    reused_blocks: list[int]
    computed_blocks: list[int]
    seconds: float  # the blocks' own time (cached blocks: the time they took when computed)
    mean_rel_error: float
    target_sparsity: float = 0.0  # the pattern's
    sparsity: float = 0.0  # achieved by the decoder linears together (zeros over weights)
    allocation: AllocationRecord | None = None  # None: every layer got the pattern
    structure: dict[str, Any] | None = None  # structured pruning: what each block keeps (StructurePlan.to_json)
    blocks: list[BlockReport]

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (what ``prune_report.json`` holds)."""
        return self.model_dump(mode="json")


class PruneResult(BaseModel):
    """What the prune flow returns."""

    model_config = ConfigDict(frozen=True)

    output: Path
    run_id: str | None  # the MLflow run (None: not tracked)
    report: PruneReport
    evaluation: EvaluationSummary | None = None
    tracking_problem: str | None = None  # why the run is not (fully) tracked and where its record is; None if it is


def build_report(model: PreparedModel, config: PruneConfig, calibration: CalibrationResult,
                 blocks: list[BlockResult], allocation: Allocation | None = None) -> PruneReport:
    """The run's report: its settings, the calibration windows used (count and sha256 of the token ids), the
    sparsity allocation or the structure, and per block and layer what the solver did."""
    structure = None
    if config.solver.structured is not None:
        from transformers import AutoConfig  # slow to import: only structured runs need it here

        from ..model.structure import plan_structure

        structure = plan_structure(AutoConfig.from_pretrained(model.folder), config.solver.structured).to_json()
    layers = [layer for block in blocks for layer in block.layers]
    weights = [layer.shape[0] * layer.shape[1] for layer in layers]
    zeros = sum(round(layer.achieved_sparsity * size) for layer, size in zip(layers, weights))
    return PruneReport(
        model=ModelIdentity(reference=model.reference, fingerprint=model.fingerprint, model_type=model.model_type,
                            num_layers=model.num_layers),
        config=config,
        solver_config=asdict(config.solver.solver_config),
        calibration=CalibrationRecord(seqlen=calibration.seqlen, tokens=calibration.tokens,
                                      tokens_sha256=calibration.tokens_sha256),
        pipeline_version=PIPELINE_VERSION,
        result_key=blocks[-1].key if blocks else "",
        reused_blocks=[b.index for b in blocks if b.cached],
        computed_blocks=[b.index for b in blocks if not b.cached],
        seconds=sum(b.seconds for b in blocks),
        mean_rel_error=sum(layer.rel_error for layer in layers) / max(len(layers), 1),
        target_sparsity=0.0 if structure else config.solver.pattern.sparsity,
        sparsity=zeros / max(sum(weights), 1),
        allocation=None if allocation is None else AllocationRecord(
            method=allocation.method, outlier_ratios=allocation.outlier_ratios,
            block_sparsity=allocation.block_sparsity, seconds=allocation.seconds, error_grid=allocation.error_grid,
            layer_errors=allocation.layer_errors),
        structure=structure,
        blocks=[BlockReport(index=b.index, seconds=b.seconds, memory=b.memory, cached=b.cached, layers=b.layers,
                            refinement=b.refinement) for b in blocks],
    )


def block_error_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per block of a report (as JSON): mean and worst relative layer error, iterations, seconds, cached."""
    rows = []
    for block in report["blocks"]:
        errors = [layer["rel_error"] for layer in block["layers"]]
        rows.append({"block": block["index"], "mean_rel_error": sum(errors) / len(errors),
                     "max_rel_error": max(errors), "iterations": sum(layer["iterations"] for layer in block["layers"]),
                     "seconds": block["seconds"], "cached": block.get("cached", False)})
    return rows
