"""One group's layer problems in one safetensors file: the shared H and input statistics once, each
member's W. Parallel solves hand problems to their workers this way, so no tensor is ever pickled into a
task parameter or result; H is stored whole, so a loaded problem is bit for bit the one saved (a
single-panel X^T X need not be exactly symmetric)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from alps_solver import LayerProblem

__all__ = ["load_group", "save_group"]

_SHARED_FIELDS = ("gram", "input_mean", "input_var", "cross")  # one per group: what its members' inputs determine


def save_group(problems: dict[str, LayerProblem], path: Path) -> None:
    """One group's problems in one file: the shared H and input statistics once, each member's W."""
    first = next(iter(problems.values()))
    for name, problem in problems.items():
        if problem.gram is not first.gram and not torch.equal(problem.gram, first.gram):
            raise ValueError(f"{name} is grouped with layers that read another input: its H differs")
    shared = {f: getattr(first, f) for f in _SHARED_FIELDS if getattr(first, f) is not None}
    tensors = {f: t.contiguous().cpu() for f, t in shared.items()}
    tensors.update({f"weight.{name}": p.weight.contiguous().cpu() for name, p in problems.items()})
    save_file(tensors, str(path), metadata={"n_tokens": str(first.n_tokens or 0)})


def load_group(path: Path, device: torch.device) -> dict[str, LayerProblem]:
    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        n_tokens = int(handle.metadata()["n_tokens"]) or None
    shared = {f: tensors[f] for f in _SHARED_FIELDS if f in tensors}  # one H tensor for every member
    members = sorted(k for k in tensors if k.startswith("weight."))
    return {key.removeprefix("weight."): LayerProblem(weight=tensors[key], n_tokens=n_tokens, **shared)
            for key in members}
