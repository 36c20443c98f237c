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
from transformers import AutoConfig, AutoModelForCausalLM

from alps_solver import SparsityPattern

from ..common.errors import AlpsError
from ..common.files import PRUNE_REPORT_FILE, SPARSITY_MANIFEST_FILE, atomic_write_json, storage_error, temporary_name
from ..model.adapters import adapter_for
from ..model.checkpoint import Checkpoint, write_like
from ..model.prepared import PreparedModel
from ..model.structure import BlockStructure, StructurePlan, planned_shape, shrink_block
from .records import BlockResult, FileRecord

__all__ = ["VerificationError", "release_activations", "saved_earlier", "saved_report", "write_pruned_model"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


class VerificationError(RuntimeError):
    """The saved model breaks the pattern or changed a tensor that was not to be pruned."""


def write_pruned_model(model: PreparedModel, blocks: list[BlockResult], pattern: SparsityPattern,
                       report: dict[str, Any], folder: Path, structure: StructurePlan | None = None) -> Path:
    """Write, verify and move the pruned model into ``folder`` (replacing what is there); returns its path.
    ``report`` (JSON-ready) is written beside the weights as ``prune_report.json``. With a ``structure`` the model
    written is the smaller one: the silenced neurons and heads removed, its config saying so. A write that fails
    for lack of space or permission raises ``StorageError`` naming the folder, and leaves nothing behind."""
    output = Path(folder).resolve()
    temporary = output.with_name(temporary_name(output) + "tmp")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        if structure is None:
            _write_verified(model, blocks, pattern, report, temporary)
        else:
            _write_shrunk(model, blocks, structure, report, temporary)
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


def _write_shrunk(model: PreparedModel, blocks: list[BlockResult], plan: StructurePlan, report: dict[str, Any],
                  temporary: Path) -> None:
    """The smaller model in ``temporary``: each block's tensors without its silenced neurons and heads
    (``shrink_block``), the config with the smaller counts, verified, and its manifest and report."""
    source = model.folder
    for item in source.iterdir():
        if item.is_file() and not _is_weight_file(item.name):
            shutil.copy2(item, temporary / item.name)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    atomic_write_json(temporary / "config.json", {**config, **plan.config_updates()})
    adapter = adapter_for(AutoConfig.from_pretrained(source))
    by_prefix = {adapter.block_prefix(block.index): block for block in blocks}
    current: dict[str, Any] = {}  # the block being written: write_like goes through a block's tensors together

    def block_of(name: str) -> tuple[str, BlockResult] | None:
        # Prefixes end in a dot, so block 1's never matches block 10's names.
        prefix = next((prefix for prefix in by_prefix if name.startswith(prefix)), None)
        return None if prefix is None else (prefix, by_prefix[prefix])

    def shrunk(prefix: str, block: BlockResult) -> dict[str, torch.Tensor]:
        if current.get("prefix") != prefix:
            with safe_open(str(block.weights.path), framework="pt") as handle:
                tensors = {n[len(prefix):]: handle.get_tensor(n) for n in handle.keys()}
            small, kept = shrink_block(tensors, plan)
            current.update(prefix=prefix, tensors=small)
            kept_by_block[block.index] = kept
        return current["tensors"]

    kept_by_block: dict[int, BlockStructure] = {}

    def replacement(name: str) -> torch.Tensor | None:
        found = block_of(name)
        return None if found is None else shrunk(*found)[name[len(found[0]):]]

    def shape(name: str, before: list[int]) -> list[int]:
        found = block_of(name)
        return before if found is None else planned_shape(plan, name[len(found[0]):], before)

    original = Checkpoint(source)
    write_like(original, temporary, replacement, shapes=shape)
    manifest = _verify_shrunk(original, Checkpoint(temporary), blocks, plan, kept_by_block, adapter, temporary)
    atomic_write_json(temporary / SPARSITY_MANIFEST_FILE, manifest)
    atomic_write_json(temporary / PRUNE_REPORT_FILE, report)


def _verify_shrunk(original: Checkpoint, saved: Checkpoint, blocks: list[BlockResult], plan: StructurePlan,
                   kept: dict[int, BlockStructure], adapter: Any, folder: Path) -> dict[str, Any]:
    """The smaller model holds what the pruned one computes: its shapes are the ones its config gives
    transformers' own model class; every removed column of an output projection was zero in the pruned block
    (nothing solved is lost); the kept columns are the solved values; the rows kept of the layers before them and
    every other tensor are the original's, bit for bit."""
    problems: list[str] = []
    with torch.device("meta"):
        expected = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).state_dict()
    if sorted(saved.names) != sorted(original.names):
        problems.append("the saved tensor names differ from the original checkpoint's")
    roles = plan.roles
    prefixes = tuple(adapter.block_prefix(block.index) for block in blocks)
    for name, tensor in saved.iter_tensors():
        if name in expected and list(expected[name].shape) != list(tensor.shape):
            problems.append(f"{name}: shape {list(tensor.shape)}, the smaller config's model has "
                            f"{list(expected[name].shape)}")
        if not name.startswith(prefixes) and not torch.equal(tensor, original.tensors([name])[name]):
            problems.append(f"{name}: changed although it is outside the pruned blocks")
    for block in blocks:
        prefix, structure = adapter.block_prefix(block.index), kept[block.index]
        with safe_open(str(block.weights.path), framework="pt") as handle:
            pruned = {n[len(prefix):]: handle.get_tensor(n) for n in handle.keys()}
        before = original.with_prefix(prefix)
        after = {n[len(prefix):]: t for n, t in saved.tensors([prefix + n for n in before]).items()}
        d = plan.head_dim
        head_rows = torch.tensor([h * d + i for h in structure.heads for i in range(d)], dtype=torch.long)
        kv_rows = torch.tensor([h * d + i for h in structure.kv_heads for i in range(d)], dtype=torch.long)
        neurons = torch.tensor(structure.neurons, dtype=torch.long)
        columns = {roles.mlp_output: neurons}
        rows = {name: neurons for name in roles.mlp_inputs}
        if plan.kept_heads < plan.heads:
            columns[roles.attention_output] = head_rows
            rows[roles.queries] = head_rows
            if plan.heads == plan.kv_heads:
                rows |= {name: kv_rows for name in roles.keys_values}
        for name, tensor in after.items():
            layer, _, suffix = name.rpartition(".")
            if suffix == "weight" and layer in columns:
                solved = pruned[name]
                dropped = torch.ones(solved.shape[1], dtype=torch.bool)
                dropped[columns[layer]] = False
                if bool(solved[:, dropped].ne(0).any()):
                    problems.append(f"{prefix}{name}: a removed column holds solved weights")
                if not torch.equal(tensor, solved[:, columns[layer]].to(tensor.dtype)):
                    problems.append(f"{prefix}{name}: the kept columns are not the solved ones")
            elif layer in rows:
                if not torch.equal(tensor, before[name][rows[layer]]):
                    problems.append(f"{prefix}{name}: the kept rows are not the original's")
            elif not torch.equal(tensor, before[name]):
                problems.append(f"{prefix}{name}: changed although structured pruning leaves it as it is")
    if problems:
        raise VerificationError("the smaller model failed verification: " + " | ".join(problems[:10]))
    parameters = {"before": original.parameters(), "after": saved.parameters()}
    return {"structure": plan.to_json(), "config": plan.config_updates(), "parameters": parameters,
            "removed_fraction": 1.0 - parameters["after"] / max(parameters["before"], 1),
            "bytes": {"before": sum(f.stat().st_size for f in original.files()),
                      "after": sum(f.stat().st_size for f in saved.files())},
            "blocks": [{"index": index, "neurons": kept[index].neurons, "heads": kept[index].heads,
                        "kv_heads": kept[index].kv_heads} for index in sorted(kept)]}


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
