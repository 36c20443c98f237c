"""The pruned model as a Hugging Face folder: the original checkpoint's files with the pruned blocks' tensors,
verified, then moved into place in one step.

The output folder is written under a temporary name beside its destination: every non-weight file of the
source folder (config, tokenizer, generation config) is copied, the safetensors files are rewritten in the
original layout (same shards, names, dtypes and shapes) with each block's tensors taken from its pruned block
file, and the result is verified before it is renamed into place: every targeted layer meets the pattern and
every other tensor is bit-identical to the original. A failed save leaves the previous folder untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from alps_solver import SparsityPattern

from ..common.errors import AlpsError
from ..common.files import PRUNE_REPORT_FILE, SPARSITY_MANIFEST_FILE, atomic_write_json, storage_error, temporary_name
from ..model.checkpoint import Checkpoint, write_like
from ..model.prepared import PreparedModel
from .records import BlockResult, FileRecord

__all__ = ["VerificationError", "release_activations", "saved_earlier", "saved_report", "write_pruned_model"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


class VerificationError(RuntimeError):
    """The saved model breaks the pattern or changed a tensor that was not to be pruned."""


def write_pruned_model(model: PreparedModel, blocks: list[BlockResult], pattern: SparsityPattern,
                       report: dict[str, Any], folder: Path) -> Path:
    """Write, verify and move the pruned model into ``folder`` (replacing what is there); returns its path.
    ``report`` (JSON-ready) is written beside the weights as ``prune_report.json``. A write that fails for lack
    of space or permission raises ``StorageError`` naming the folder, and leaves nothing behind."""
    output = Path(folder).resolve()
    temporary = output.with_name(temporary_name(output) + "tmp")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        _write_verified(model, blocks, pattern, report, temporary)
        if output.exists():
            retired = output.with_name(temporary_name(output) + "old")
            os.replace(output, retired)
            os.replace(temporary, output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(temporary, output)
    except Exception as error:
        if (storage := storage_error(error, output)) is not None:
            raise storage from error
        raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return output


def saved_earlier(folder: Path, report: dict[str, Any]) -> bool:
    """Whether ``folder`` already holds this run's model: an earlier attempt of the same run (same settings)
    saved and verified it, then was stopped before the end (during its tracking or evaluation). The same result
    (``result_key``: model, calibration and every block's solve) is kept as it is; the same settings with another
    result (the model file or the calibration text changed since) raise an error naming the fix."""
    saved = saved_report(folder)
    if saved is None or saved.get("config") != report["config"]:
        return False
    if saved.get("result_key") and saved.get("result_key") == report["result_key"]:
        return True
    raise AlpsError("output.folder", str(folder), "holds a model pruned with these settings from other inputs "
                    "(the model or the calibration text changed since it was saved)",
                    "pass --overwrite to replace it, or choose a new --output")


def saved_report(folder: Path) -> dict[str, Any] | None:
    """The ``prune_report.json`` a pruned folder holds, None if it holds no readable one."""
    try:
        saved = json.loads((Path(folder) / PRUNE_REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def _write_verified(model: PreparedModel, blocks: list[BlockResult], pattern: SparsityPattern, report: dict[str, Any],
                    temporary: Path) -> None:
    """The pruned model in ``temporary``: the source's other files, the checkpoint with the blocks' pruned
    tensors in its layout and dtype, verified, and its manifest and report."""
    source = model.folder
    for item in source.iterdir():
        if item.is_file() and not _is_weight_file(item.name):
            shutil.copy2(item, temporary / item.name)
    pruned_in = {}  # tensor name -> the block file holding its pruned value
    for block in blocks:
        with safe_open(str(block.weights.path), framework="pt") as handle:
            pruned_in.update({name: str(block.weights.path) for name in handle.keys()})

    def replacement(name: str) -> torch.Tensor | None:
        if name not in pruned_in:
            return None
        with safe_open(pruned_in[name], framework="pt") as handle:
            return handle.get_tensor(name)

    original = Checkpoint(source)
    write_like(original, temporary, replacement)
    manifest = _verify(original, Checkpoint(temporary), blocks, pattern)
    atomic_write_json(temporary / SPARSITY_MANIFEST_FILE, manifest)
    atomic_write_json(temporary / PRUNE_REPORT_FILE, report)


def release_activations(records: list[FileRecord]) -> int:
    """Delete calibration activation files once the model is saved (cached block results stay valid: a later
    run that needs them replays the blocks before it). Returns how many were deleted."""
    removed = 0
    for record in records:
        if record.path.is_file():
            record.path.unlink()
            removed += 1
    return removed


def _is_weight_file(name: str) -> bool:
    """Weight files (and their indexes) of any format: the output gets only the pruned safetensors."""
    return name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json")


def _verify(original: Checkpoint, saved: Checkpoint, blocks: list[BlockResult],
            pattern: SparsityPattern) -> dict[str, Any]:
    """Every targeted layer meets the pattern and every other tensor is bit-identical to the original."""
    targeted: dict[str, SparsityPattern] = {}  # tensor name -> the pattern its layer was solved to
    for block in blocks:
        with safe_open(str(block.weights.path), framework="pt") as handle:
            names = list(handle.keys())
        for layer in block.layers:
            name = next(n for n in names if n.endswith(f".{layer.name}.weight"))
            targeted[name] = SparsityPattern.parse(layer.pattern)
    problems: list[str] = []
    tensors: dict[str, Any] = {}
    if sorted(saved.names) != sorted(original.names):
        problems.append("the saved tensor names differ from the original checkpoint's")
    for name, tensor in saved.iter_tensors():
        if name in targeted:
            issues = targeted[name].violations(tensor != 0)
            if issues:
                problems.append(f"{name}: {'; '.join(issues)}")
            tensors[name] = {"pattern": str(targeted[name]), "shape": list(tensor.shape),
                             "sparsity": 1.0 - float((tensor != 0).sum()) / tensor.numel()}
        elif not torch.equal(tensor, original.tensors([name])[name]):
            problems.append(f"{name}: changed although it is not a pruned layer")
    missing = sorted(set(targeted) - set(tensors))
    if missing:
        problems.append(f"pruned layers missing from the saved model: {missing[:5]}")
    if problems:
        raise VerificationError("the pruned model failed verification: " + " | ".join(problems[:10]))
    total = sum(t["shape"][0] * t["shape"][1] for t in tensors.values())
    zeros = sum(t["sparsity"] * t["shape"][0] * t["shape"][1] for t in tensors.values())
    return {"pattern": str(pattern), "targeted_sparsity": zeros / max(total, 1), "tensors": tensors}
