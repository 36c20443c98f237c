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
            original, read = getattr(problem, stat), getattr(again, stat)
            assert read is None if original is None else (torch.equal(read, original) and read.dtype == original.dtype)
    q, k = loaded["block00.self_attn.q_proj"], loaded["block00.self_attn.k_proj"]
    assert q.gram is k.gram and q.input_mean is k.input_mean and q.input_var is k.input_var
    assert q.gram is not loaded["block03.self_attn.q_proj"].gram
    # Same problems, same solution.
    for name in ("block00.mlp.down_proj", "block03.self_attn.q_proj"):
        assert torch.equal(solve(loaded[name], "0.5").weight, solve(problems[name], "0.5").weight)
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temporary file left


def test_a_failed_save_leaves_no_file(tmp_path, problems, monkeypatch) -> None:
    import bench.problems

    def fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(bench.problems, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_problems(tmp_path / "p.safetensors", problems, {})
    assert list(tmp_path.iterdir()) == []


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


def test_solving_from_a_file_needs_only_torch_and_safetensors(tmp_path, problems) -> None:
    """What the GPU machine has: torch (with its own dependencies), numpy and safetensors, not our pipeline's
    stack. Every other import is refused, in a fresh interpreter, while both benches load and solve."""
    path = save_problems(tmp_path / "p.safetensors", problems, {"blocks": [0, 3], "layers": ["q_proj"]})
    script = f"""
import sys
ALLOWED = set(sys.stdlib_module_names) | {{
    "torch", "torchgen", "functorch", "numpy", "safetensors",  # what the GPU machine's image provides
    "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec", "filelock", "typing_extensions",  # torch's
    "alps_solver", "bench", "tasks"}}

class Refuse:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top not in ALLOWED and not top.startswith("_"):
            raise ModuleNotFoundError(f"refused: {{name}}")  # as for a package not installed

sys.meta_path.insert(0, Refuse())
sys.path.insert(0, {str(REPO)!r})
import argparse
from bench.layer_bench import problems_for
import bench.block_bench
found = problems_for(argparse.Namespace(problems={str(path)!r}, save_problems=None, blocks=None, layers=None))
from alps_solver import solve
print(len(found), sorted(m for m in ("transformers", "prefect", "pydantic") if m in sys.modules),
      solve(next(iter(found.values())), "0.5").weight.shape[0])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["2", "[]", "6"]  # both blocks' q_proj, solved


_BLOCK_LAYERS = {"self_attn.q_proj": 8, "self_attn.k_proj": 4, "self_attn.v_proj": 4, "self_attn.o_proj": 8,
                 "mlp.gate_proj": 16, "mlp.up_proj": 16, "mlp.down_proj": 8}  # name -> d_out
_GROUPS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "mlp", "up_proj": "mlp"}


def _whole_blocks(tmp_path: Path) -> Path:
    """A file like a real capture: all seven linears of blocks 0 and 3, layers that read one input share H."""
    generator = torch.Generator().manual_seed(2)
    found = {}
    for block in (0, 3):
        grams: dict[str, torch.Tensor] = {}
        for name, d_out in _BLOCK_LAYERS.items():
            short = name.rsplit(".", 1)[-1]
            d_in = 16 if short == "down_proj" else 8
            H = grams.setdefault(_GROUPS.get(short, short), _gram(generator, d_in))
            found[f"block{block:02d}.{name}"] = _problem(generator, d_out, H)
    layers = [name.rsplit(".", 1)[-1] for name in _BLOCK_LAYERS]
    return save_problems(tmp_path / "blocks.safetensors", found,
                         {"model": "tiny", "calibration": "c4", "data_dir": None, "nsamples": 4, "seqlen": 8,
                          "seed": 0, "blocks": [0, 3], "layers": layers})


def test_both_benches_run_from_a_file(tmp_path, monkeypatch, capsys) -> None:
    import json

    from bench import block_bench, layer_bench

    path = _whole_blocks(tmp_path)
    output = tmp_path / "layers.json"
    common = ["--problems", str(path), "--threads", "1", "--patterns", "0.5", "--output", str(output)]
    monkeypatch.setattr(sys, "argv", ["layer_bench", *common, "--methods", "sparsegpt", "alps"])
    layer_bench.main()
    record = json.loads(output.read_text())
    assert record["settings"]["model"] == "tiny" and record["settings"]["blocks"] == [0, 3]
    assert {row["layers"] for row in record["rows"]} == {14}
    assert record["summary"]["0.5"]["alps_over_sparsegpt_error"] > 0

    # --merge adds a method's rows to a file made from the same problems, and refuses other problems.
    monkeypatch.setattr(sys, "argv", ["layer_bench", *common, "--methods", "magnitude", "--merge"])
    layer_bench.main()
    assert [row["method"] for row in json.loads(output.read_text())["rows"]] == ["sparsegpt", "alps", "magnitude"]
    monkeypatch.setattr(sys, "argv", ["layer_bench", *common, "--methods", "wanda", "--merge", "--blocks", "0"])
    with pytest.raises(SystemExit, match="other \\['blocks'\\]"):
        layer_bench.main()

    output = tmp_path / "blocks.json"
    monkeypatch.setattr(sys, "argv", ["block_bench", "--problems", str(path), "--threads", "1",
                                      "--methods", "sparsegpt",
                                      "--repeats", "1", "--output", str(output)])
    block_bench.main()
    summary = json.loads(output.read_text())["summary"]["sparsegpt"]
    assert summary["identical"] is True
    assert "({0: 4, 3: 4} distinct H per block)" in capsys.readouterr().out  # q/k/v and gate/up still share
