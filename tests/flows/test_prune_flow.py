"""The pruning flow end to end on tiny random LLaMA and OPT models, under the Prefect test harness."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from alps_solver import SparsityPattern
from flows.prune import prune_model
from tasks.common.errors import AlpsError, DataError, ModelReferenceError
from tasks.config.prune import PruneConfig, RuntimeConfig
from tasks.data.sampling import calibration_windows, tokens_sha256
from tasks.prune import threads_per_worker

REPO = Path(__file__).resolve().parents[2]
VOCAB = 49152  # the bundled SmolLM2 tokenizer's, used for calibration text


def save_model(folder: Path, tokenizer, kind: str = "llama", layers: int = 2, hidden: int = 64,
               intermediate: int = 128, seed: int = 0, dtype: torch.dtype = torch.float32,
               shard_size: str | None = None) -> Path:
    torch.manual_seed(seed)
    if kind == "gemma3_text":  # sliding and full attention layers, each with its own mask and rotary table
        config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=128, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"] * (layers // 2))
        model = Gemma3ForCausalLM(config)
    elif kind == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=128, tie_word_embeddings=True)
        model = LlamaForCausalLM(config)
    else:
        config = OPTConfig(vocab_size=VOCAB, hidden_size=hidden, ffn_dim=intermediate, num_hidden_layers=layers,
                           num_attention_heads=4, word_embed_proj_dim=hidden, max_position_embeddings=128)
        model = OPTForCausalLM(config)
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": shard_size} if shard_size else {}))
    tokenizer.save_pretrained(folder)
    return folder


# Where each setting a test names lives in the nested PruneConfig.
_SECTIONS = {"method": "solver", "pattern": "solver", "method_config": "solver", "true_sequential": "solver",
             "gram_dtype": "solver", "targets": "solver", "target_mix": "solver", "allocation": "solver",
             "refine": "solver",
             "calibration": ("calibration", "dataset"),
             "nsamples": "calibration",
             "seqlen": "calibration", "seed": "calibration", "device": "runtime", "threads": "runtime",
             "batch_size": "runtime", "task_runner": "runtime", "solve_workers": "runtime",
             "runner_address": "runtime", "cache_dir": "runtime", "data_dir": "runtime",
             "keep_activations": "runtime", "keep_every": "runtime", "offload_activations": "runtime",
             "activation_dtype": "calibration", "output": ("output", "folder"), "overwrite": "output",
             "experiment": "output", "log_model": "output", "eval_ppl": ("evaluation", "perplexity"),
             "eval_tasks": ("evaluation", "tasks"), "eval_limit": ("evaluation", "limit"),
             "eval_max_windows": ("evaluation", "max_windows"), "eval_seqlen": ("evaluation", "seqlen")}


def settings_for(model_dir: Path, tmp: Path, **overrides) -> dict:
    """PruneConfig fields for a tiny run, with ``overrides`` given by their short names (``nsamples=8``,
    ``evaluate=True``, ``eval_seqlen=32``)."""
    flat = dict(method="alps", pattern="0.5", calibration="pydoc", nsamples=4, seqlen=32, device="cpu",
                output=tmp / "out", cache_dir=tmp / "cache", batch_size=2, evaluate=False)
    flat.update(overrides)
    settings: dict = {"model": str(flat.pop("model", model_dir))}
    evaluate = flat.pop("evaluate")
    for name, value in flat.items():
        section, field = _SECTIONS[name] if isinstance(_SECTIONS[name], tuple) else (_SECTIONS[name], name)
        settings.setdefault(section, {})[field] = value
    if not evaluate:
        settings["evaluation"] = None
    return settings


def config_for(model_dir: Path, tmp: Path, **overrides) -> PruneConfig:
    return PruneConfig(**settings_for(model_dir, tmp, **overrides))


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def is_block_linear(name: str) -> bool:
    return ".layers." in name and name.endswith(("proj.weight", "fc1.weight", "fc2.weight"))


@pytest.mark.parametrize(("kind", "pattern", "true_sequential"),
                         [("llama", "0.5", False), ("llama", "2:4", True), ("opt", "0.7", False),
                          ("gemma3_text", "0.5", False)])
def test_prunes_end_to_end(prefect_harness, tokenizer, tmp_path, kind, pattern, true_sequential):
    model_dir = save_model(tmp_path / "model", tokenizer, kind)
    result = prune_model(config_for(model_dir, tmp_path, pattern=pattern, true_sequential=true_sequential))
    output = result.output

    reloaded = AutoModelForCausalLM.from_pretrained(output)  # transformers loads it as is
    assert reloaded.config.model_type == kind
    with torch.no_grad():
        logits = reloaded(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()

    before, after = tensors_of(model_dir), tensors_of(output)
    assert set(before) == set(after)
    p = SparsityPattern.parse(pattern)
    pruned = [n for n in after if is_block_linear(n)]
    assert len(pruned) == 2 * (6 if kind == "opt" else 7)
    for name, tensor in after.items():
        if name in pruned:
            assert p.violations(tensor != 0) == [], name
            assert int((tensor != 0).sum()) == p.kept_count(*tensor.shape)
        else:
            assert torch.equal(tensor, before[name]), f"{name} changed"

    manifest = json.loads((output / "sparsity_manifest.json").read_text())
    assert set(manifest["tensors"]) == set(pruned)
    report = json.loads((output / "prune_report.json").read_text())
    layers = [layer for block in report["blocks"] for layer in block["layers"]]
    assert len(layers) == len(pruned)
    assert all(layer["achieved_sparsity"] == pytest.approx(p.sparsity, abs=0.01) for layer in layers)
    assert all(0 <= layer["rel_error"] <= 1 for layer in layers)
    assert report["computed_blocks"] == [0, 1] and report["reused_blocks"] == []
    # The report names the exact calibration windows: the same sampler, settings and tokenizer give its hash.
    windows = calibration_windows("pydoc", AutoTokenizer.from_pretrained(model_dir), nsamples=4, seqlen=32)
    assert report["calibration"] == {"seqlen": 32, "tokens": 4 * 32, "tokens_sha256": tokens_sha256(windows)}


def test_rerun_reuses_blocks_and_a_changed_parameter_recomputes(prefect_harness, tokenizer, tmp_path):
    model_dir = save_model(tmp_path / "model", tokenizer, layers=3)
    first = prune_model(config_for(model_dir, tmp_path))
    weights = tensors_of(first.output)

    again = prune_model(config_for(model_dir, tmp_path, overwrite=True))
    assert again.report.reused_blocks == [0, 1, 2] and again.report.computed_blocks == []
    assert all(torch.equal(t, weights[n]) for n, t in tensors_of(again.output).items())

    changed = prune_model(config_for(model_dir, tmp_path, pattern="0.6", overwrite=True))
    assert changed.report.computed_blocks == [0, 1, 2]
    method = prune_model(config_for(model_dir, tmp_path, pattern="0.6", method="wanda", overwrite=True))
    assert method.report.computed_blocks == [0, 1, 2]


def test_damaged_cache_file_is_recomputed(prefect_harness, tokenizer, tmp_path):
    model_dir = save_model(tmp_path / "model", tokenizer, layers=3)
    first = prune_model(config_for(model_dir, tmp_path))
    expected = tensors_of(first.output)
    block_files = sorted((tmp_path / "cache" / "blocks").glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    damaged = block_files[1]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # truncated

    rerun = prune_model(config_for(model_dir, tmp_path, overwrite=True))
    assert 1 in rerun.report.computed_blocks and 2 in rerun.report.reused_blocks
    assert all(torch.equal(t, expected[n]) for n, t in tensors_of(rerun.output).items())


def test_inputs_that_vanish_after_planning_are_rebuilt(prefect_harness, tokenizer, tmp_path, monkeypatch):
    """Another run on the same cache folder can release activations between this run's plan and its blocks:
    the missing inputs are rebuilt by replaying the blocks before, and the result is unchanged."""
    import flows.prune

    model_dir = save_model(tmp_path / "model", tokenizer, layers=3)
    first = prune_model(config_for(model_dir, tmp_path, keep_activations=True))
    expected = tensors_of(first.output)
    cache = tmp_path / "cache"
    by_age = sorted((cache / "blocks").glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    by_age[2].unlink()  # block 2 must be solved again, on block 1's outputs, which the plan finds intact
    plan_run = flows.prune.plan_run

    def plan_then_release(model, config):
        chain = plan_run(model, config)
        for path in (cache / "activations").glob("*.safetensors"):
            path.unlink()  # every activation, the calibration inputs included, is gone once the plan is made
        return chain

    monkeypatch.setattr(flows.prune, "plan_run", plan_then_release)
    rerun = prune_model(config_for(model_dir, tmp_path, overwrite=True))
    assert rerun.report.computed_blocks == [2] and rerun.report.reused_blocks == [0, 1]
    assert all(torch.equal(t, expected[n]) for n, t in tensors_of(rerun.output).items())


def _watch_scratch(monkeypatch, cache: Path) -> list[dict[str, int]]:
    """The activation files (name: bytes) present each time a block finishes, before its inputs are released:
    the peaks."""
    import flows.prune

    seen: list[dict[str, int]] = []
    release = flows.prune.release_superseded

    def watched(blocks, runtime):
        seen.append({path.name: path.stat().st_size for path in (cache / "activations").glob("*.safetensors")})
        release(blocks, runtime)

    monkeypatch.setattr(flows.prune, "release_superseded", watched)
    return seen


@contextlib.contextmanager
def _solving_stops_at(monkeypatch, stop: int):
    """A run inside fails when it comes to solve block ``stop``; solving works again afterwards."""
    import tasks.blockwise.steps as steps

    solve = steps.solve_block

    def stopping(key, index, *args, **kwargs):
        if index == stop:
            raise RuntimeError(f"stopped at block {stop}")
        return solve(key, index, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(steps, "solve_block", stopping)
        with pytest.raises(RuntimeError, match=f"block {stop}"):
            yield


def _record_calls(monkeypatch) -> dict[str, list[int]]:
    """The blocks each run solves and replays."""
    import tasks.blockwise.steps as steps

    calls: dict[str, list[int]] = {"solved": [], "replayed": []}
    solve, replay = steps.solve_block, steps.replay_block

    def solving(key, index, *args, **kwargs):
        calls["solved"].append(index)
        return solve(key, index, *args, **kwargs)

    def replaying(result, *args, **kwargs):
        calls["replayed"].append(result.index)
        return replay(result, *args, **kwargs)

    monkeypatch.setattr(steps, "solve_block", solving)
    monkeypatch.setattr(steps, "replay_block", replaying)
    return calls


def test_scratch_is_bounded_and_a_resume_replays_from_the_nearest_kept_boundary(prefect_harness, tokenizer,
                                                                                  tmp_path, monkeypatch):
    """On a sharded bf16 checkpoint: the scratch holds the calibration inputs and the current block's inputs and
    outputs (plus every K-th boundary with keep_every), whatever the depth; a resume rebuilds missing inputs by
    running the cached pruned blocks forward from the nearest kept boundary, solving nothing twice, and gives
    the same model bit for bit, written in the checkpoint's dtype and files."""
    model_dir = save_model(tmp_path / "model", tokenizer, layers=6, dtype=torch.bfloat16, shard_size="2MB")
    assert len(list(model_dir.glob("model-*.safetensors"))) > 1
    seen = _watch_scratch(monkeypatch, tmp_path / "reference" / "cache")
    reference = prune_model(config_for(model_dir, tmp_path / "reference"))
    assert [len(files) for files in seen] == [2, 3, 3, 3, 3, 3]  # does not grow with depth
    assert not list((tmp_path / "reference" / "cache" / "activations").glob("*.safetensors"))  # released at the end

    cache = tmp_path / "cache"
    seen = _watch_scratch(monkeypatch, cache)
    with _solving_stops_at(monkeypatch, 4):
        prune_model(config_for(model_dir, tmp_path, keep_every=2))
    # Calibration inputs, current inputs and outputs, and boundary 2 (the inputs of block 2) kept from block 3 on.
    assert [len(files) for files in seen] == [2, 3, 3, 4]
    left = sorted((cache / "activations").glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    assert len(left) == 3
    left[-1].unlink()  # the inputs of block 4 are lost too: they must come from boundary 2, two blocks back

    calls = _record_calls(monkeypatch)
    resumed = prune_model(config_for(model_dir, tmp_path, keep_every=2))
    assert calls == {"solved": [4, 5], "replayed": [2, 3]}
    assert resumed.report.computed_blocks == [4, 5]
    want, got = tensors_of(reference.output), tensors_of(resumed.output)
    assert set(want) == set(got) and all(torch.equal(got[n], want[n]) for n in want)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert sorted(p.name for p in resumed.output.glob("*.safetensors")) == \
        sorted(p.name for p in model_dir.glob("*.safetensors"))
    assert (resumed.output / "model.safetensors.index.json").is_file()


def _final_hidden(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    with torch.no_grad():
        return model(tokens, output_hidden_states=True).hidden_states[-1]


def test_dense_targets_bring_the_model_closer_to_the_dense_one_and_resume_bit_identical(prefect_harness, tokenizer,
                                                                                       tmp_path, monkeypatch):
    """Dense targets fit every layer to the dense model's outputs on the calibration windows (target_mix 1): the
    pruned model's last hidden states there are closer to the dense model's than with layer targets, at the same
    sparsity; so are the default mix's (its order against the full target's depends on which supports ALPS
    picks, which changes with the machine's rounding: not checked). A run stopped midway whose inputs are gone
    resumes by replaying both streams (pruned and dense), bit for bit; another mix solves every block again."""
    model_dir = save_model(tmp_path / "model", tokenizer, layers=4)
    settings = dict(nsamples=8, pattern="0.7")
    layer = prune_model(config_for(model_dir, tmp_path / "layer", **settings))
    full = prune_model(config_for(model_dir, tmp_path / "full", targets="dense", target_mix=1.0, **settings))
    dense = prune_model(config_for(model_dir, tmp_path / "dense", targets="dense", **settings))
    solver = dense.report.to_json()["config"]["solver"]
    assert solver["targets"] == "dense" and solver["target_mix"] == PruneConfig().solver.target_mix < 1.0
    tokens = calibration_windows("pydoc", tokenizer, nsamples=8, seqlen=32, seed=0)
    reference = _final_hidden(model_dir, tokens)
    errors = {name: float((_final_hidden(run.output, tokens) - reference).square().sum() / reference.square().sum())
              for name, run in (("layer", layer), ("full", full), ("mix", dense))}
    assert errors["mix"] < errors["layer"] and errors["full"] < 0.9 * errors["layer"], errors
    for name, tensor in tensors_of(dense.output).items():
        if is_block_linear(name):
            assert int((tensor != 0).sum()) == SparsityPattern.parse("0.7").kept_count(*tensor.shape), name

    with _solving_stops_at(monkeypatch, 2):
        prune_model(config_for(model_dir, tmp_path, targets="dense", **settings))
    newest = max((tmp_path / "cache" / "activations").glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    with safe_open(str(newest), framework="pt") as handle:
        assert {"hidden", "dense"} <= set(handle.keys())  # a boundary after block 0 carries both streams
    newest.unlink()
    calls = _record_calls(monkeypatch)
    resumed = prune_model(config_for(model_dir, tmp_path, targets="dense", **settings))
    assert calls == {"solved": [2, 3], "replayed": [0, 1]}
    want, got = tensors_of(dense.output), tensors_of(resumed.output)
    assert all(torch.equal(got[n], want[n]) for n in want)
    calls = _record_calls(monkeypatch)
    prune_model(config_for(model_dir, tmp_path, targets="dense", target_mix=0.5, overwrite=True, **settings))
    assert calls["solved"] == [0, 1, 2, 3]


def test_block_refinement_lowers_each_blocks_error_is_tracked_and_resumes_bit_identical(prefect_harness, tokenizer,
                                                                                       tmp_path, monkeypatch):
    """Block refinement after each block's solve: every block's output error against the dense block's falls, the
    pruned model's last hidden states on the calibration windows come closer to the dense model's, the sparsity
    stays exact; the per-block errors are in the report and in MLflow; a stopped run resumes bit for bit."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model_dir = save_model(tmp_path / "model", tokenizer, layers=4)
    settings = dict(nsamples=8, pattern="0.7", refine={"method": "adam", "epochs": 4, "lr": 1e-3, "batch": 2})
    plain = prune_model(config_for(model_dir, tmp_path / "plain", nsamples=8, pattern="0.7"))
    refined = prune_model(config_for(model_dir, tmp_path / "refined", **settings))
    blocks = refined.report.to_json()["blocks"]
    assert all(b["refinement"]["steps"] == 16 and b["refinement"]["error_after"] < b["refinement"]["error_before"]
               for b in blocks), blocks
    assert all(b["refinement"] is None for b in plain.report.to_json()["blocks"])
    tokens = calibration_windows("pydoc", tokenizer, nsamples=8, seqlen=32, seed=0)
    reference = _final_hidden(model_dir, tokens)
    errors = {name: float((_final_hidden(run.output, tokens) - reference).square().sum() / reference.square().sum())
              for name, run in (("plain", plain), ("refined", refined))}
    assert errors["refined"] < errors["plain"], errors
    for name, tensor in tensors_of(refined.output).items():
        if is_block_linear(name):
            assert int((tensor != 0).sum()) == SparsityPattern.parse("0.7").kept_count(*tensor.shape), name
    history = MlflowClient(uri).get_metric_history(refined.run_id, "block/refine_error_after")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]

    with _solving_stops_at(monkeypatch, 2):
        prune_model(config_for(model_dir, tmp_path, **settings))
    calls = _record_calls(monkeypatch)
    resumed = prune_model(config_for(model_dir, tmp_path, **settings))
    assert calls["solved"] == [2, 3]
    want, got = tensors_of(refined.output), tensors_of(resumed.output)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_owl_allocation_spreads_the_sparsity_and_keeps_the_total_exact(prefect_harness, tokenizer, tmp_path,
                                                                       monkeypatch):
    """OWL: the blocks get different sparsities (more outliers, fewer pruned weights), every layer a whole number of
    zeros, and the decoder linears together exactly the target's; saved, verified and reported per layer. The
    allocation is a cached step: a rerun with another method reuses it (and recaptures the released calibration
    inputs for its solves)."""
    import tasks.prune

    measured = []
    measure = tasks.prune.measure_blocks
    monkeypatch.setattr(tasks.prune, "measure_blocks", lambda *a, **k: measured.append(1) or measure(*a, **k))
    model_dir = save_model(tmp_path / "model", tokenizer, layers=4)
    allocation = {"method": "owl", "spread": 0.1}
    result = prune_model(config_for(model_dir, tmp_path, pattern="0.6", allocation=allocation))
    record = result.report.to_json()
    blocks = record["allocation"]["block_sparsity"]
    assert len(blocks) == 4 and max(blocks) - min(blocks) == pytest.approx(0.2, abs=1e-9)
    assert sum(blocks) / 4 == pytest.approx(0.6)
    ratios = record["allocation"]["outlier_ratios"]
    assert blocks.index(min(blocks)) == ratios.index(max(ratios))

    pruned = {n: t for n, t in tensors_of(result.output).items() if is_block_linear(n)}
    zeros = sum(int((t == 0).sum()) for t in pruned.values())
    weights = sum(t.numel() for t in pruned.values())
    assert zeros == round(0.6 * weights) and record["sparsity"] == zeros / weights
    manifest = json.loads((result.output / "sparsity_manifest.json").read_text())
    for block in record["blocks"]:
        for layer in block["layers"]:
            name = f"model.layers.{block['index']}.{layer['name']}.weight"
            kept = int((pruned[name] != 0).sum())
            assert kept == SparsityPattern.parse(layer["pattern"]).kept_count(*pruned[name].shape)
            assert manifest["tensors"][name]["pattern"] == layer["pattern"]
            assert abs(layer["target_sparsity"] - blocks[block["index"]]) * pruned[name].numel() <= 1.0 + 1e-6
    assert measured == [1]

    other = prune_model(config_for(model_dir, tmp_path, pattern="0.6", allocation=allocation, method="sparsegpt",
                                   output=tmp_path / "other"))
    assert measured == [1]  # the allocation was reused from the cache
    assert other.report.to_json()["allocation"] == record["allocation"]


@pytest.mark.parametrize("granularity", ["layer", "block", "layer-in-block"])
def test_error_allocation_gives_sparsity_where_the_dense_layers_lose_least(prefect_harness, tokenizer, tmp_path,
                                                                          granularity):
    """Error-driven allocation: each layer's SparseGPT error curve on the dense model is in the report, the layers
    (or the blocks, their layers alike) get sparsities within target +- lambda that differ, the decoder linears
    hold exactly the target's zeros, and the summed interpolated error is no more than uniform's."""
    from tasks.blockwise.allocation import curve_at

    model_dir = save_model(tmp_path / "model", tokenizer, layers=3)
    allocation = {"method": "error", "spread": 0.1, "granularity": granularity}
    result = prune_model(config_for(model_dir, tmp_path, pattern="0.6", allocation=allocation))
    record = result.report.to_json()
    grid = record["allocation"]["error_grid"]
    assert grid == pytest.approx([0.5, 0.55, 0.6, 0.65, 0.7])
    curves = record["allocation"]["layer_errors"]
    assert len(curves) == 3 and all(len(c) == 7 and all(len(v) == 5 for v in c.values()) for c in curves)
    assert all(v[0] < v[-1] for c in curves for v in c.values())  # pruning more costs more

    pruned = {n: t for n, t in tensors_of(result.output).items() if is_block_linear(n)}
    zeros = sum(int((t == 0).sum()) for t in pruned.values())
    assert zeros == round(0.6 * sum(t.numel() for t in pruned.values()))
    chosen, uniform, per_block = 0.0, 0.0, []
    for block in record["blocks"]:
        sparsities = {}
        for layer in block["layers"]:
            name = f"model.layers.{block['index']}.{layer['name']}.weight"
            got = int((pruned[name] == 0).sum()) / pruned[name].numel()
            assert got == pytest.approx(layer["target_sparsity"])
            assert 0.5 - 1e-6 <= layer["target_sparsity"] <= 0.7 + 1e-6
            sparsities[layer["name"]] = layer["target_sparsity"]
            curve = curves[block["index"]][layer["name"]]
            chosen += curve_at(grid, curve, min(max(got, 0.5), 0.7))
            uniform += curve_at(grid, curve, 0.6)
        per_block.append(sparsities)
    spread_within = [max(s.values()) - min(s.values()) for s in per_block]
    if granularity != "block":
        assert max(spread_within) > 0.02
    if granularity == "layer-in-block":
        assert record["allocation"]["block_sparsity"] == pytest.approx([0.6] * 3, abs=1e-3)
    if granularity == "block":
        assert max(spread_within) < 0.01  # alike but for the rounding to whole weights
        assert sum(record["allocation"]["block_sparsity"]) / 3 == pytest.approx(0.6, abs=1e-3)  # blocks alike in size
    assert chosen <= uniform * 1.001


def test_a_stopped_allocation_measures_again_only_the_blocks_it_had_not_finished(prefect_harness, tokenizer,
                                                                                 tmp_path, monkeypatch):
    """The allocation keeps each block's measurement as it goes: a run stopped while measuring block 1 leaves
    block 0's, the next run only runs block 0 forward, and the allocation equals an unbroken run's."""
    import tasks.blockwise.allocation as allocation_module

    model_dir = save_model(tmp_path / "model", tokenizer, layers=3)
    settings = dict(pattern="0.6", allocation={"method": "error", "spread": 0.1})
    unbroken = prune_model(config_for(model_dir, tmp_path / "unbroken", **settings)).report.to_json()["allocation"]

    curves, measured = allocation_module._error_curves, []

    def counting(stop: int | None):
        def measure(block, inputs, grid, batch_size):
            measured.append(len(measured))
            if len(measured) == stop:
                raise RuntimeError("stopped at block 1")
            return curves(block, inputs, grid, batch_size)

        return measure

    with monkeypatch.context() as patch:
        patch.setattr(allocation_module, "_error_curves", counting(2))
        with pytest.raises(RuntimeError, match="block 1"):
            prune_model(config_for(model_dir, tmp_path, **settings))
    measured.clear()
    monkeypatch.setattr(allocation_module, "_error_curves", counting(None))
    resumed = prune_model(config_for(model_dir, tmp_path, **settings)).report.to_json()["allocation"]
    assert measured == [0, 1]  # two blocks measured, 1 and 2: block 0 came from its kept part
    assert {k: v for k, v in resumed.items() if k != "seconds"} == {
        k: v for k, v in unbroken.items() if k != "seconds"}
    assert not any((tmp_path / "cache" / "allocation-parts").glob("*/*.json"))  # removed once the result is cached


def test_an_fp16_checkpoint_is_solved_in_float32_and_written_back_in_fp16(prefect_harness, tokenizer, tmp_path):
    model_dir = save_model(tmp_path / "model", tokenizer, dtype=torch.float16)
    result = prune_model(config_for(model_dir, tmp_path))
    before, after = tensors_of(model_dir), tensors_of(result.output)
    assert {t.dtype for t in after.values()} == {torch.float16}
    pruned = [name for name in after if is_block_linear(name)]
    assert all(int((after[n] != 0).sum()) == after[n].numel() // 2 for n in pruned)
    assert all(torch.equal(after[n], before[n]) for n in after if n not in pruned)
    reloaded = AutoModelForCausalLM.from_pretrained(result.output, dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(reloaded(torch.tensor([[1, 2, 3]])).logits).all()


def test_bf16_activations_on_the_host_halve_the_scratch_and_barely_move_the_errors(prefect_harness, tokenizer,
                                                                                   tmp_path):
    model_dir = save_model(tmp_path / "model", tokenizer, layers=2)
    full = prune_model(config_for(model_dir, tmp_path / "full", keep_activations=True, activation_dtype="float32"))
    half = prune_model(config_for(model_dir, tmp_path / "half", keep_activations=True,
                                  activation_dtype="bfloat16", offload_activations=True))
    for run, dtype in (("full", "F32"), ("half", "BF16")):
        files = list((tmp_path / run / "cache" / "activations").glob("*.safetensors"))
        assert len(files) == 3
        for file in files:
            with safe_open(file, framework="pt") as handle:
                assert handle.get_slice("hidden").get_dtype() == dtype
    size = {run: sum(f.stat().st_size for f in (tmp_path / run / "cache" / "activations").glob("*"))
            for run in ("full", "half")}
    assert size["half"] < 0.6 * size["full"]
    errors = [[layer.rel_error for block in result.report.blocks for layer in block.layers] for result in (full, half)]
    assert errors[0] != errors[1]  # the inputs did change
    assert all(abs(a - b) <= 0.05 * a + 1e-4 for a, b in zip(*errors))


def test_the_plans_scratch_matches_the_run_and_a_run_that_cannot_fit_is_refused(prefect_harness, tokenizer, tmp_path,
                                                                                  monkeypatch):
    import tasks.prune
    from tasks.planning.check import Available, InsufficientResources, plan_for

    model_dir = save_model(tmp_path / "model", tokenizer, layers=4, hidden=128, intermediate=256)
    config = config_for(model_dir, tmp_path, nsamples=8, seqlen=64)
    seen = _watch_scratch(monkeypatch, tmp_path / "cache")
    prune_model(config)
    plan = plan_for(str(model_dir), config)
    activations = max(sum(files.values()) for files in seen)
    weights = sum(p.stat().st_size for p in (tmp_path / "cache" / "blocks").glob("*.safetensors"))
    assert abs(plan.activations - activations) / activations < 0.25, (plan.activations, activations)
    assert abs(plan.pruned_weights - weights) / weights < 0.25, (plan.pruned_weights, weights)

    # What the finished run left in its cache (the pruned weights) counts as available to a rerun on that
    # cache; the same free space refuses a run on an empty cache.
    free = plan.activations + plan.output + 0.5 * plan.pruned_weights
    monkeypatch.setattr(tasks.prune, "available", lambda config, device: Available(
        scratch_free=free, output_free=None, host=1e12, device=None))
    assert prune_model(config.model_copy(update={"output": config.output.model_copy(
        update={"overwrite": True})})).report.reused_blocks == [0, 1, 2, 3]
    refused = config_for(model_dir, tmp_path / "refused", nsamples=8, seqlen=64)
    with pytest.raises(InsufficientResources, match="scratch disk"):
        prune_model(refused)
    assert not (tmp_path / "refused" / "out").exists() and not (tmp_path / "refused" / "cache" / "blocks").exists()
    forced = prune_model(refused.model_copy(
        update={"runtime": refused.runtime.model_copy(update={"check_resources": False})}))
    assert forced.output.is_dir()


def test_the_run_publishes_its_block_errors(prefect_harness, tokenizer, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    result = prune_model(config_for(save_model(tmp_path / "model", tokenizer), tmp_path))
    newest = ArtifactFilter(key=ArtifactFilterKey(any_=["block-errors"]))
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=newest, sort=ArtifactSort.CREATED_DESC, limit=1)
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert [row["block"] for row in rows] == [0, 1]
    report = json.loads((result.output / "prune_report.json").read_text())
    errors = [layer["rel_error"] for layer in report["blocks"][1]["layers"]]
    assert rows[1]["max_rel_error"] == round(max(errors), 6)


RUN_SCRIPT = textwrap.dedent("""
    import json, sys
    from flows.prune import prune_model
    from tasks.config.prune import PruneConfig
    result = prune_model(PruneConfig.model_validate_json(sys.argv[1]))
    print("RESULT " + result.model_dump_json(exclude={"report"}))
""")


def _subprocess_env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PYTHONPATH=str(REPO))
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()  # the harness's server: no second server to orphan
    return env


def test_resume_after_sigkill_is_bit_identical(prefect_harness, tokenizer, tmp_path):
    model_dir = save_model(tmp_path / "model", tokenizer, layers=6, hidden=128, intermediate=256)
    reference = prune_model(config_for(model_dir, tmp_path / "reference", nsamples=8, seqlen=64))

    config = config_for(model_dir, tmp_path / "resumed", nsamples=8, seqlen=64)
    blocks = tmp_path / "resumed" / "cache" / "blocks"
    process = subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, config.model_dump_json()], cwd=REPO,
                               env=_subprocess_env(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if blocks.is_dir() and len(list(blocks.glob("*.safetensors"))) >= 2:
            break
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = {p: p.stat().st_mtime_ns for p in blocks.glob("*.safetensors")}
    assert 2 <= len(finished) < 6, "the kill must land in the middle of the run"
    assert not (tmp_path / "resumed" / "out").exists(), "a killed run leaves no output folder"

    resumed = prune_model(config)
    assert 0 in resumed.report.reused_blocks and resumed.report.computed_blocks, resumed
    assert len(resumed.report.reused_blocks) >= len(finished) - 1  # the last file may predate its cache record
    # Blocks that had finished were not recomputed: their files are untouched. Only the newest file may be
    # rewritten, when the kill fell between writing it and Prefect recording the task's result.
    for path in sorted(finished, key=finished.get)[:-1]:
        assert path.stat().st_mtime_ns == finished[path], f"{path.name} was rewritten although its block had finished"
    want, got = tensors_of(reference.output), tensors_of(resumed.output)
    assert set(want) == set(got) and all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize(
    ("overrides", "error", "text"),
    [
        ({"model": "no/such-model-here"}, AlpsError, "hub"),
        ({"model": "./missing-folder.gguf"}, ModelReferenceError, "no GGUF file"),
        ({"pattern": "3:7"}, AlpsError, "not divisible by M=7"),
        ({"calibration": "wikitext2", "data_dir": "EMPTY"}, DataError, "wikitext2"),
    ],
)
def test_bad_input_fails_clearly_and_leaves_no_output(prefect_harness, tokenizer, tmp_path, overrides, error, text):
    model_dir = save_model(tmp_path / "model", tokenizer)
    if overrides.get("data_dir") == "EMPTY":
        overrides["data_dir"] = tmp_path / "empty"
        overrides["data_dir"].mkdir()
    with pytest.raises(error) as info:
        prune_model(config_for(model_dir, tmp_path, **overrides))
    assert text in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("overrides", "field"), [({"pattern": "1.2"}, "sparsity"), ({"pattern": "4:4"}, "N (kept)"),
                                                  ({"method": "obs"}, "method"), ({"seqlen": 1}, "seqlen"),
                                                  ({"method_config": {"max_iter": 0}}, "max_iter")])
def test_bad_settings_are_rejected_before_running(tmp_path, overrides, field):
    with pytest.raises(ValidationError) as info:
        config_for(tmp_path / "model", tmp_path, **overrides)
    assert field in str(info.value)


def test_non_empty_output_needs_overwrite(prefect_harness, tokenizer, tmp_path):
    model_dir = save_model(tmp_path / "model", tokenizer)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    with pytest.raises(AlpsError, match="--overwrite"):
        prune_model(config_for(model_dir, tmp_path))
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_the_same_run_again_keeps_the_model_it_saved_and_other_inputs_need_overwrite(prefect_harness, tokenizer,
                                                                                      tmp_path):
    """A run stopped after its save (during tracking or evaluation) is run again as the same command: the folder
    it saved is its own finished result, kept as it is; the same settings on a changed model are refused."""
    model_dir = save_model(tmp_path / "model", tokenizer)
    first = prune_model(config_for(model_dir, tmp_path))
    saved = {file.name: file.stat().st_ino for file in first.output.iterdir()}
    again = prune_model(config_for(model_dir, tmp_path))  # no --overwrite
    assert again.report.reused_blocks == [0, 1]
    assert {file.name: file.stat().st_ino for file in again.output.iterdir()} == saved, "kept, not rewritten"

    save_model(model_dir, tokenizer, seed=1)  # the same path and settings, other weights
    with pytest.raises(AlpsError, match="other inputs.*--overwrite"):
        prune_model(config_for(model_dir, tmp_path))
    assert {file.name: file.stat().st_ino for file in first.output.iterdir()} == saved


MEMORY_SCRIPT = RUN_SCRIPT + textwrap.dedent("""
    import resource
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def _peak_rss_kb(model_dir: Path, tmp: Path) -> int:
    config = config_for(model_dir, tmp, method="magnitude", nsamples=2, seqlen=16)
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, config.model_dump_json()], cwd=REPO,
                          env=_subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(row for row in done.stdout.splitlines() if row.startswith("PEAK_RSS_KB"))
    return int(line.split()[1])


def test_peak_memory_does_not_grow_with_depth(prefect_harness, tokenizer, tmp_path):
    # Blocks of 38 MB each: a pipeline that held the whole model would need 450 MB more for 16 blocks
    # than for 4, about 40% of the process's footprint.
    shallow = save_model(tmp_path / "m4", tokenizer, layers=4, hidden=768, intermediate=3072)
    deep = save_model(tmp_path / "m16", tokenizer, layers=16, hidden=768, intermediate=3072)
    peak4 = _peak_rss_kb(shallow, tmp_path / "run4")
    peak16 = _peak_rss_kb(deep, tmp_path / "run16")
    assert abs(peak16 - peak4) / peak4 < 0.25, (peak4, peak16)


# dsnot reads the input mean and variance too: they must travel to the workers with W and H.
@pytest.mark.parametrize(("runner", "workers", "method"), [("threads", 3, "alps"), ("dask", 2, "alps"),
                                                           ("threads", 2, "dsnot")])
def test_parallel_layer_solves_match_the_sequential_run(prefect_harness, tokenizer, tmp_path, runner, workers,
                                                        method):
    model_dir = save_model(tmp_path / "model", tokenizer, layers=2)
    sequential = prune_model(config_for(model_dir, tmp_path / "sequential", pattern="0.6", method=method))
    parallel = prune_model(config_for(model_dir, tmp_path / "parallel", pattern="0.6", method=method,
                                      task_runner=runner, solve_workers=workers))
    want, got = tensors_of(sequential.output), tensors_of(parallel.output)
    assert set(want) == set(got) and all(torch.equal(got[n], want[n]) for n in want)
    report = json.loads((parallel.output / "prune_report.json").read_text())
    assert len([layer for block in report["blocks"] for layer in block["layers"]]) == 14
    assert not any((tmp_path / "parallel" / "cache" / "layers").glob("*/*.safetensors"))  # work files removed


# q/k/v and gate/up share H: ALPS decomposes each block's four distinct H once, in process or on workers;
# a true-sequential stage is one group, which three workers solve layer by layer (each its own H's factors).
@pytest.mark.parametrize(("workers", "true_sequential", "per_block"), [(1, False, 4), (2, False, 4), (1, True, 4),
                                                                     (3, True, 7)])
def test_each_shared_h_is_decomposed_once_per_task(prefect_harness, tokenizer, tmp_path, monkeypatch, workers,
                                                   true_sequential, per_block):
    model_dir = save_model(tmp_path / "model", tokenizer, layers=2)
    calls = [0]
    eigh = torch.linalg.eigh

    def counted(*args, **kwargs):
        calls[0] += 1
        return eigh(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", counted)
    result = prune_model(config_for(model_dir, tmp_path / "run", pattern="0.6", solve_workers=workers,
                                    true_sequential=true_sequential))
    report = json.loads((result.output / "prune_report.json").read_text())
    groups = {(block["index"], layer["group"]) for block in report["blocks"] for layer in block["layers"]}
    assert len(groups) == 8 and calls[0] == 2 * per_block
    if workers > 1:
        monkeypatch.setattr(torch.linalg, "eigh", eigh)
        alone = prune_model(config_for(model_dir, tmp_path / "alone", pattern="0.6", true_sequential=true_sequential))
        want, got = tensors_of(alone.output), tensors_of(result.output)
        assert set(want) == set(got) and all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize(("threads", "parallel", "expected"), [
    (2, {"runner": "threads", "workers": 2}, 1),
    (8, {"runner": "threads", "workers": 3}, 2),
    (1, {"runner": "threads", "workers": 4}, 1),
    (6, {"runner": "dask", "workers": 2, "address": None}, 3),  # Dask's local cluster: threads of this process
    (6, {"runner": "dask", "workers": 2, "address": "tcp://scheduler:8786"}, 6),
    (6, {"runner": "ray", "workers": 2}, 3),  # a local Ray runs on this machine too
    (6, {"runner": "ray", "workers": 2, "address": "ray://head:10001"}, 6),
    (None, {"runner": "ray", "workers": 2, "address": "ray://head:10001"}, None),
])
def test_workers_in_this_process_share_its_threads(threads, parallel, expected):
    assert threads_per_worker(runtime_of(threads, parallel)) == expected


def test_workers_share_torch_default_threads_when_none_are_set():
    assert threads_per_worker(runtime_of(None, {"runner": "threads", "workers": 2})) == \
        max(1, torch.get_num_threads() // 2)


def runtime_of(threads, parallel) -> RuntimeConfig:
    return RuntimeConfig(threads=threads, task_runner=parallel["runner"], solve_workers=parallel["workers"],
                         runner_address=parallel.get("address"))


def test_one_mlflow_run_holds_pruning_and_evaluation(prefect_harness, tokenizer, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model_dir = save_model(tmp_path / "model", tokenizer)
    result = prune_model(config_for(model_dir, tmp_path, evaluate=True, eval_max_windows=2, eval_seqlen=32))
    assert result.evaluation.perplexity["pydoc"] > 1  # evaluated on the calibration set's held-out text
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["method"] == "alps" and run.data.tags["pattern"] == "0.5"
    assert run.data.params["prune.calibration.nsamples"] == "4"
    assert "ppl/pydoc" in run.data.metrics and "prune/mean_rel_error" in run.data.metrics
    history = MlflowClient(uri).get_metric_history(result.run_id, "layer/rel_error")
    assert len(history) == 14 and sorted(m.step for m in history) == list(range(14))
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(result.run_id, "plots")}
    assert {"plots/layer_error.png", "plots/layer_sparsity.png", "plots/solver_history.png"} <= artifacts


def test_a_failed_run_is_marked_failed_in_mlflow(prefect_harness, tokenizer, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model_dir = save_model(tmp_path / "model", tokenizer)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError):  # pruning works, evaluating on a missing data set fails
        prune_model(config_for(model_dir, tmp_path, evaluate=True, eval_ppl=["wikitext2"], data_dir=empty))
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("alps").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "prune/mean_rel_error" in runs[0].data.metrics  # what was logged before the failure stays


def test_checkpoint_with_other_tensor_names_is_converted_once(prefect_harness, tokenizer, tmp_path):
    """opt-350m and larger store ``decoder.*`` rather than ``model.decoder.*``: converted once, then pruned."""
    from safetensors.torch import load_file, save_file

    model_dir = save_model(tmp_path / "model", tokenizer, kind="opt")
    weights = model_dir / "model.safetensors"
    tensors = load_file(weights)
    save_file({n.removeprefix("model."): t for n, t in tensors.items()}, str(weights), metadata={"format": "pt"})
    result = prune_model(config_for(model_dir, tmp_path, pattern="0.5"))
    pruned = tensors_of(result.output)
    assert any(n.startswith("model.decoder.layers.0.") for n in pruned)
    assert SparsityPattern.parse("0.5").violations(pruned["model.decoder.layers.1.fc1.weight"] != 0) == []
    assert AutoModelForCausalLM.from_pretrained(result.output).config.model_type == "opt"
