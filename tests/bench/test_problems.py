"""Layer-problem files: what the benches solve on a machine that cannot capture them."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alps_solver import LayerProblem, solve
from bench.layer_bench import problems_for
from bench.problems import load_problems, save_problems

REPO = Path(__file__).resolve().parents[2]


def _problem(generator: torch.Generator, d_out: int, H: torch.Tensor, stats: dict | None = None) -> LayerProblem:
    return LayerProblem(weight=torch.randn(d_out, H.shape[0], generator=generator), gram=H, n_tokens=64,
                        **(stats or {}))


def _gram(generator: torch.Generator, d_in: int) -> torch.Tensor:
    X = torch.randn(64, d_in, generator=generator, dtype=torch.float64)
    G = X.T @ X
    return (G + G.T) / 2  # exactly symmetric, as the pipeline's H is (a product's rounding can break it)


@pytest.fixture
def problems() -> dict[str, LayerProblem]:
    generator = torch.Generator().manual_seed(0)
    found = {}
    for block in (0, 3):
        shared, alone = _gram(generator, 12), _gram(generator, 20)
        stats = {"input_mean": torch.randn(12, generator=generator), "input_var": torch.rand(12, generator=generator)}
        found[f"block{block:02d}.self_attn.q_proj"] = _problem(generator, 6, shared, stats)
        found[f"block{block:02d}.self_attn.k_proj"] = _problem(generator, 3, shared, stats)  # one input: one H
        found[f"block{block:02d}.mlp.down_proj"] = _problem(generator, 12, alone)
    return found


def test_round_trip_keeps_every_tensor_and_which_layers_share_h(tmp_path, problems) -> None:
    settings = {"model": "tiny", "blocks": [0, 3], "layers": ["q_proj", "k_proj", "down_proj"]}
    path = save_problems(tmp_path / "p.safetensors", problems, settings)
    loaded, read_settings = load_problems(path)
    assert read_settings == settings
    assert list(loaded) == list(problems)
    for name, problem in problems.items():
        again = loaded[name]
        assert torch.equal(again.weight, problem.weight) and again.weight.dtype == problem.weight.dtype
        assert torch.equal(again.gram, problem.gram) and again.gram.dtype == torch.float64
        assert again.n_tokens == problem.n_tokens
        for stat in ("input_mean", "input_var"):
            original = getattr(problem, stat)
            assert (getattr(again, stat) is None) if original is None else torch.equal(getattr(again, stat), original)
    q, k = loaded["block00.self_attn.q_proj"], loaded["block00.self_attn.k_proj"]
    assert q.gram is k.gram and q.input_mean is k.input_mean and q.input_var is k.input_var
    assert q.gram is not loaded["block03.self_attn.q_proj"].gram
    # Same problems, same solution.
    for name in ("block00.mlp.down_proj", "block03.self_attn.q_proj"):
        assert torch.equal(solve(loaded[name], "0.5").weight, solve(problems[name], "0.5").weight)
    assert not list(tmp_path.glob("*.partial"))


def test_the_file_stores_each_tensor_once_and_each_h_as_its_lower_triangle(tmp_path, problems) -> None:
    from safetensors import safe_open

    with safe_open(str(save_problems(tmp_path / "p.safetensors", problems, {})), framework="pt") as file:
        sizes = {k: file.get_tensor(k).numel() for k in file.keys()}
    assert sorted(n for k, n in sizes.items() if k.startswith("gram.")) == [12 * 13 // 2] * 2 + [20 * 21 // 2] * 2
    assert sum(k.startswith("weight.") for k in sizes) == 6
    assert sum(k.startswith("input_mean.") for k in sizes) == 2  # one per block: q and k share theirs


def test_an_h_that_is_not_exactly_symmetric_comes_back_as_its_lower_triangle_mirrored(tmp_path) -> None:
    generator = torch.Generator().manual_seed(1)
    H = _gram(generator, 5)
    H[0, 4] += 1e-9  # upper triangle off by rounding
    path = save_problems(tmp_path / "p.safetensors", {"block00.q_proj": _problem(generator, 2, H)}, {})
    loaded = load_problems(path)[0]["block00.q_proj"].gram
    assert torch.equal(loaded, H.tril() + H.tril(-1).T)


def test_bad_files_are_refused_with_the_fix(tmp_path) -> None:
    with pytest.raises(SystemExit, match="no such file; write one with --save-problems"):
        load_problems(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SystemExit, match="not a layer-problems file"):
        load_problems(tmp_path / "other.safetensors")


def _options(**given) -> argparse.Namespace:
    defaults = {"problems": None, "save_problems": None, "blocks": None, "layers": None, "model": "smollm2-135m",
                "calibration": "c4", "data_dir": None, "nsamples": 32, "seqlen": 512, "seed": 0}
    return argparse.Namespace(**{**defaults, **given})


def test_loaded_problems_are_chosen_by_block_and_layer_and_replace_the_capture_settings(tmp_path, problems) -> None:
    settings = {"model": "tiny", "calibration": "pydoc", "data_dir": None, "nsamples": 4, "seqlen": 8, "seed": 3,
                "blocks": [0, 3], "layers": ["q_proj", "k_proj", "down_proj"]}
    path = save_problems(tmp_path / "p.safetensors", problems, settings)

    options = _options(problems=str(path))
    assert list(problems_for(options)) == list(problems)  # no choice: everything in the file
    assert (options.model, options.nsamples, options.blocks) == ("tiny", 4, [0, 3])  # recorded as captured

    options = _options(problems=str(path), blocks=[0], layers=["q_proj", "down_proj"])
    assert list(problems_for(options)) == ["block00.self_attn.q_proj", "block00.mlp.down_proj"]
    assert (options.blocks, options.layers) == ([0], ["q_proj", "down_proj"])

    with pytest.raises(SystemExit, match=r"lacks block 3 o_proj, block 5 q_proj, block 5 o_proj \(it holds blocks"):
        problems_for(_options(problems=str(path), blocks=[3, 5], layers=["q_proj", "o_proj"]))
    with pytest.raises(SystemExit, match="give one"):
        problems_for(_options(problems=str(path), save_problems=str(tmp_path / "again.safetensors")))


def test_solving_from_a_file_needs_neither_transformers_nor_prefect(tmp_path, problems) -> None:
    """What the GPU machine has: torch and safetensors, not our pipeline's stack."""
    path = save_problems(tmp_path / "p.safetensors", problems, {"blocks": [0, 3], "layers": ["q_proj"]})
    script = (
        "import sys, argparse\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from bench.layer_bench import problems_for\n"
        f"found = problems_for(argparse.Namespace(problems={str(path)!r}, save_problems=None, blocks=None, layers=None))\n"
        "import bench.block_bench\n"
        "heavy = sorted(m for m in ('transformers', 'prefect', 'mlflow', 'datasets', 'pydantic') if m in sys.modules)\n"
        "print(len(found), heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["2", "[]"]
