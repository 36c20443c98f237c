"""What the block-wise steps hand each other: small typed records that point at the tensors' files.

Tensors never travel as task parameters or results: each step writes its tensors to safetensors files and
returns a record naming them (``FileRecord``: path, size, sha256), so a cached result is a few kilobytes and
a later run can tell whether the files it points at are still intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..common.files import sha256_file

__all__ = ["BlockResult", "CalibrationResult", "FileRecord", "LayerReport", "RefinementRecord"]


class FileRecord(BaseModel):
    """A file a result points at, with the size and sha256 it had when it was written."""

    model_config = ConfigDict(frozen=True)

    path: Path
    size: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> FileRecord:
        path = Path(path)
        return cls(path=path, size=path.stat().st_size, sha256=sha256_file(path))

    def is_intact(self) -> bool:
        """True when the file exists with its recorded size and sha256 (not truncated, not damaged)."""
        return (self.path.is_file() and self.path.stat().st_size == self.size
                and sha256_file(self.path) == self.sha256)


class LayerReport(BaseModel):
    """What solving one layer did: its error before and after the backsolve, iterations, status, time, and the
    solver's own record (history, rho updates, backsolve)."""

    model_config = ConfigDict(frozen=True)

    name: str
    shape: list[int]
    group: str
    method: str
    pattern: str
    target_sparsity: float
    achieved_sparsity: float
    rel_error: float
    rel_error_before_backsolve: float | None
    iterations: int
    status: str
    seconds: float
    solver: dict[str, Any] = {}  # alps_solver's Result.summary()


class CalibrationResult(BaseModel):
    """The calibration capture: the inputs of block 0, and which token windows produced them."""

    model_config = ConfigDict(frozen=True)

    key: str  # the cache key it was computed under
    inputs: FileRecord  # hidden states and block keywords (tasks.blockwise.capture)
    seqlen: int  # tokens per window: the configured seqlen, capped by the model's context
    tokens: int
    tokens_sha256: str  # of the token ids: names the exact windows, so another tool can calibrate on them too


class RefinementRecord(BaseModel):
    """What refining one block did (``tasks.blockwise.refine``): its relative output error before and after,
    the optimiser's steps and the time."""

    model_config = ConfigDict(frozen=True)

    error_before: float
    steps: int
    seconds: float
    # Measured on the outputs of the weights as saved (rounded to the checkpoint's dtype), which the block step
    # computes anyway for the next block's inputs.
    error_after: float | None = None


class BlockResult(BaseModel):
    """One pruned block: its tensors, the next block's inputs, and one report per linear layer."""

    model_config = ConfigDict(frozen=True)

    key: str  # the cache key it was computed under
    index: int
    weights: FileRecord  # every tensor of the block, in the checkpoint's names and dtypes
    outputs: FileRecord  # the block's outputs on its calibration inputs: the next block's inputs
    layers: list[LayerReport]
    seconds: float
    memory: dict[str, float]  # peak_rss_mb, and peak_cuda_mb on a GPU
    refinement: RefinementRecord | None = None  # with block refinement (SolverSpec.refine)
    cached: bool = False  # set by the run that reused it from the cache

    @property
    def mean_rel_error(self) -> float:
        return sum(layer.rel_error for layer in self.layers) / max(len(self.layers), 1)
