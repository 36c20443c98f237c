"""Group files of tasks/blockwise/group_files.py: one H per group of layers that read the same input."""

from __future__ import annotations

import pytest
import torch

from alps_solver import LayerProblem
from tasks.blockwise.group_files import load_group, save_group


def members(stats: bool = True) -> dict[str, LayerProblem]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 6, generator=g, dtype=torch.float64)
    H = X.T @ X
    extra = {"input_mean": X.mean(0), "input_var": X.var(0)} if stats else {}
    return {name: LayerProblem(weight=torch.randn(rows, 6, generator=g), gram=H, n_tokens=40, **extra)
            for name, rows in (("q_proj", 4), ("k_proj", 2), ("v_proj", 2))}


@pytest.mark.parametrize("stats", [True, False])
def test_a_group_file_holds_h_once_and_loads_as_one_shared_tensor(tmp_path, stats):
    problems = members(stats)
    path = tmp_path / "group.safetensors"
    save_group(problems, path)
    loaded = load_group(path, torch.device("cpu"))
    assert list(loaded) == sorted(problems)
    first = loaded["q_proj"]
    for name, problem in loaded.items():
        assert problem.gram is first.gram  # so a GramCache hits without comparing values
        assert torch.equal(problem.weight, problems[name].weight) and torch.equal(problem.gram, problems[name].gram)
        assert problem.n_tokens == 40
        assert (problem.input_mean is not None) == stats
        if stats:
            assert torch.equal(problem.input_mean, problems[name].input_mean)


def test_a_member_with_another_h_is_refused(tmp_path):
    problems = members()
    odd = problems["v_proj"]
    problems["v_proj"] = LayerProblem(weight=odd.weight, gram=odd.gram * 2, n_tokens=40)
    with pytest.raises(ValueError, match="v_proj is grouped with layers that read another input"):
        save_group(problems, tmp_path / "group.safetensors")
