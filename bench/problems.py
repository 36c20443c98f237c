"""Layer problems in one safetensors file, so a bench can solve them where the model cannot be loaded.

A GPU machine may have only torch and safetensors (no GGUF support, none of our data, no Prefect). So the
problems are captured where the whole stack is (``layer_bench.py --save-problems FILE``), the file is
copied over, and the solves run there (``--problems FILE``); loading needs only torch, safetensors and
``alps_solver``.

Each distinct tensor is stored once, and each H as its lower triangle: H is symmetric, so that halves the
largest tensors (the pipeline's H is float64: the 12 problems of the README's layer bench take 70 MB instead
of 110), and the lower triangle is the one ``torch.linalg.eigh`` reads. Layers that shared a tensor (a
group's H and input means) share one again after loading, as in the pipeline. The capture's settings
travel in the file's metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from alps_solver import LayerProblem
from tasks.common.files import atomic_write

FORMAT = "alps-layer-problems/1"
_FIELDS = ("weight", "gram", "input_mean", "input_var")


def save_problems(path: str | Path, problems: dict[str, LayerProblem], settings: dict) -> Path:
    """Write ``problems`` (name -> LayerProblem) and the ``settings`` they were captured with to ``path``."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    # (field, id of a tensor) -> its key in the file, and the tensor itself: held, so no id is reused
    stored: dict[tuple[str, int], tuple[str, torch.Tensor]] = {}

    def store(field: str, tensor: torch.Tensor | None) -> str | None:
        if tensor is None:
            return None
        if (field, id(tensor)) not in stored:  # a tensor that layers share (a group's H, its input means) once
            key = f"{field}.{len(tensors)}"  # unique: one key per tensor stored
            stored[field, id(tensor)] = key, tensor
            tensors[key] = _lower_triangle(tensor) if field == "gram" else tensor.detach().cpu().contiguous()
        return stored[field, id(tensor)][0]

    index = {name: {**{field: store(field, getattr(problem, field)) for field in _FIELDS},
                    "n_tokens": problem.n_tokens} for name, problem in problems.items()}
    metadata = {"format": FORMAT, "problems": json.dumps(index), "settings": json.dumps(settings)}
    # Never a half-written file under the real name, and no temporary one left behind on an error.
    return atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def load_problems(path: str | Path) -> tuple[dict[str, LayerProblem], dict]:
    """The problems of a file written by ``save_problems``, and the settings they were captured with."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--problems {path}: no such file; write one with --save-problems")
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise SystemExit(f"--problems {path}: not a layer-problems file ({FORMAT}); write one with --save-problems")
        loaded: dict[str, torch.Tensor] = {}  # key -> tensor: layers that shared one share it again

        def fetch(key: str | None) -> torch.Tensor | None:
            if key is not None and key not in loaded:
                tensor = file.get_tensor(key)
                loaded[key] = _symmetric(tensor) if key.startswith("gram.") else tensor
            return None if key is None else loaded[key]

        problems = {name: LayerProblem(**{field: fetch(entry[field]) for field in _FIELDS}, n_tokens=entry["n_tokens"])
                    for name, entry in json.loads(metadata["problems"]).items()}
    return problems, json.loads(metadata["settings"])


def _lower_triangle(H: torch.Tensor) -> torch.Tensor:
    rows, columns = torch.tril_indices(H.shape[0], H.shape[0], device=H.device)
    return H.detach()[rows, columns].cpu().contiguous()


def _symmetric(packed: torch.Tensor) -> torch.Tensor:
    """The (d, d) symmetric matrix whose lower triangle, row by row, is ``packed`` (length d (d + 1) / 2)."""
    d = round(((8 * packed.numel() + 1) ** 0.5 - 1) / 2)
    rows, columns = torch.tril_indices(d, d)
    H = torch.zeros(d, d, dtype=packed.dtype)
    H[rows, columns] = packed
    H[columns, rows] = packed  # the upper triangle mirrors the lower (the diagonal is written twice, the same)
    return H
