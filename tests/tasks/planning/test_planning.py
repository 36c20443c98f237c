"""Resource plans (tasks/planning): shapes read from configs alone, the plan's hand-checkable terms, the
shortfalls and their fixes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tasks.blockwise.capture import capture_block_inputs
from tasks.blockwise.gram import discover_groups
from tasks.config.prune import PruneConfig
from tasks.model.adapters import build_block
from tasks.planning.check import InsufficientResources, check_plan, plan_for, shape_of
from tasks.planning.estimate import Shortfall, plan_resources, shortfalls
from tasks.planning.rates import MachineRates
from tasks.planning.shapes import load_model_config, model_shape

RATES = MachineRates(matmul_gflops=100.0, eigh_seconds=20.0, source="given")
LLAMA_70B = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
             "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def config(**settings) -> PruneConfig:
    sections = {"nsamples": "calibration", "seqlen": "calibration", "activation_dtype": "calibration",
                "keep_every": "runtime", "keep_activations": "runtime", "offload_activations": "runtime",
                "batch_size": "runtime", "true_sequential": "solver", "method": "solver", "refine": "solver",
                "allocation": "solver", "structured": "solver"}
    settings.setdefault("activation_dtype", "float32")  # the hand-checked sizes below are float32's
    nested: dict = {}
    for name, value in settings.items():
        nested.setdefault(sections[name], {})[name] = value
    return PruneConfig(**nested)


@pytest.fixture
def tiny_llama(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    return tmp_path, model


def test_shapes_from_the_config_match_the_model(tiny_llama):
    folder, model = tiny_llama
    shape = shape_of(str(folder))
    block = model.model.layers[0]
    assert shape.layers == 3 and shape.hidden == 32 and shape.checkpoint_bytes == 2
    assert shape.block_params == sum(p.numel() for p in block.parameters())
    assert shape.stem_params + 3 * shape.block_params == sum(p.numel() for p in model.parameters())
    assert [(layer.name, layer.d_out, layer.d_in) for layer in shape.linears] == [
        (name, module.out_features, module.in_features) for name, module in block.named_modules()
        if isinstance(module, torch.nn.Linear)]
    # The groups the plan assumes are the ones a forward finds.
    tokens = torch.randint(0, 100, (2, 8))
    inputs = capture_block_inputs(folder, tokens, device=torch.device("cpu"))
    found = discover_groups(build_block(folder, 0, torch.float32, torch.device("cpu")), inputs)
    assert {group[0]: len(group) for group in found} == {
        leader: sum(layer.group == leader for layer in shape.linears) for leader in shape.groups}


def test_a_bare_config_json_is_enough(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_70B))
    shape = model_shape(load_model_config(path))
    assert shape.groups == {"self_attn.q_proj": 8192, "self_attn.o_proj": 8192, "mlp.gate_proj": 8192,
                            "mlp.down_proj": 28672}
    assert shape.checkpoint_bytes == 2 and round(shape.model_bytes / 1e9) == 141  # Llama-3.1-70B in bf16


def test_scratch_is_a_few_boundaries_whatever_the_depth(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_70B))
    shape = model_shape(load_model_config(path))
    run = config(nsamples=128, seqlen=2048)
    plan = plan_resources("70b", shape, run, 2048, RATES, "cuda", baseline=0)
    boundary = 128 * 2048 * 8192 * 4
    assert plan.boundary == boundary and plan.boundaries_on_disk == 3
    assert plan.activations == 3 * boundary  # 25.8 GB, not one boundary per block (690 GB)
    shallow = plan_resources("70b", model_shape(load_model_config(path)).__class__(
        **{**shape.__dict__, "layers": 4}), run, 2048, RATES, "cuda", baseline=0)
    assert shallow.activations == plan.activations
    kept = plan_resources("70b", shape, config(nsamples=128, seqlen=2048, keep_every=20), 2048, RATES, "cuda", 0)
    assert kept.boundaries_on_disk == 3 + 3  # boundaries 20, 40 and 60 are kept as well
    every = plan_resources("70b", shape, config(nsamples=128, seqlen=2048, keep_activations=True), 2048, RATES,
                           "cuda", 0)
    assert every.activations == 81 * boundary
    half = plan_resources("70b", shape, config(nsamples=128, seqlen=2048, activation_dtype="bfloat16"), 2048, RATES,
                          "cuda", 0)
    assert half.activations == plan.activations / 2
    offloaded = plan_resources("70b", shape, config(nsamples=128, seqlen=2048, offload_activations=True), 2048,
                               RATES, "cuda", 0)
    # The device's peak is the solve (the inputs beside every H); the outputs come once the Hs are freed.
    assert plan.device_memory - offloaded.device_memory == pytest.approx(boundary)
    assert plan.pruned_weights == 80 * shape.block_params * 2


def test_block_refinement_holds_its_target_and_adds_its_passes(tmp_path):
    """Refinement keeps the block's target output (one stream) where the inputs are, and costs per epoch a forward
    and a backward (3 forwards) over every window plus two forwards (the target and the error before)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_70B))
    shape = model_shape(load_model_config(path))
    plain = plan_resources("70b", shape, config(nsamples=128, seqlen=2048), 2048, RATES, "cuda", baseline=0)
    refined = {epochs: plan_resources("70b", shape, config(nsamples=128, seqlen=2048, refine={
        "method": "adam", "epochs": epochs}), 2048, RATES, "cuda", baseline=0) for epochs in (1, 3)}
    stream = 128 * 2048 * 8192 * 4
    assert refined[1].device_memory - plain.device_memory == pytest.approx(stream)  # the solve's peak, plus it
    assert refined[1].activations == plain.activations  # nothing more on disk
    tokens = 128 * 2048
    forward = (2.0 * tokens * shape.linear_params + 2.0 * tokens * 2048 * shape.attention_width) / 100e9
    assert refined[1].block_seconds - plain.block_seconds == pytest.approx(5 * forward)
    assert refined[3].block_seconds - refined[1].block_seconds == pytest.approx(6 * forward)


def test_an_allocation_adds_its_dense_pass_and_the_error_allocation_its_solves(tmp_path):
    """OWL and the error allocation run the dense model once more, block by block, before the solves: a phase of
    their own holding only the calibration inputs on disk; the error allocation's time grows by one SparseGPT
    update sweep (d_out x d_in^2 flops) per layer for every point of its grid."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_70B))
    shape = model_shape(load_model_config(path))
    plans = {name: plan_resources("70b", shape, config(nsamples=128, seqlen=2048, allocation=allocation), 2048,
                                  RATES, "cuda", baseline=0)
             for name, allocation in (("uniform", {}), ("owl", {"method": "owl"}),
                                      ("error", {"method": "error"}), ("one point", {"method": "error", "spread": 0}))}
    assert [p.name for p in plans["uniform"].phases] == ["calibration", "block solve", "save"]
    assert [p.name for p in plans["owl"].phases] == ["calibration", "allocation", "block solve", "save"]
    stream = 128 * 2048 * 8192 * 4
    assert all(plans[name].phases[1].disk == stream for name in ("owl", "error"))
    assert plans["error"].scratch == plans["uniform"].scratch
    sweeps = sum(layer.d_out * layer.d_in ** 2 for layer in shape.linears)
    extra = plans["error"].phases[1].seconds - plans["one point"].phases[1].seconds
    assert extra == pytest.approx(80 * 4 * sweeps / 100e9)
    assert plans["error"].seconds > plans["owl"].seconds > plans["uniform"].seconds


def test_a_structured_plan_saves_the_smaller_model(tmp_path):
    """With --structured the output folder is the smaller model's: Llama-3.1-70B at mlp:0.3,heads:0.25 keeps 70% of
    each block's 28672 neurons (three rows or columns of 8192 each) and 6 of every 8 query heads per key/value
    group (q_proj's rows and o_proj's columns, 128 each); only down_proj and o_proj are solved."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_70B))
    shape = model_shape(load_model_config(path))
    full = plan_for(str(path), config(nsamples=128, seqlen=2048), rates=RATES, device="cuda", baseline=0)
    smaller = plan_for(str(path), config(nsamples=128, seqlen=2048, structured="mlp:0.3,heads:0.25"), rates=RATES,
                       device="cuda", baseline=0)
    kept_neurons = round(0.7 * 28672)
    removed = 3 * (28672 - kept_neurons) * 8192 + 2 * (64 - 48) * 128 * 8192  # per block
    assert full.output == shape.model_bytes
    assert smaller.output == shape.model_bytes - 80 * removed * 2  # bf16
    assert smaller.phases[-1].seconds == pytest.approx(full.phases[-1].seconds * smaller.output / full.output)
    assert smaller.scratch == full.scratch  # the solved blocks stay full-size until the save
    assert smaller.block_seconds < full.block_seconds  # two layers solved, not seven


def test_what_does_not_fit_names_the_numbers_and_the_fixes(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_70B))
    shape = model_shape(load_model_config(path))
    run = config(nsamples=128, seqlen=2048, keep_every=10)
    plan = plan_resources("70b", shape, run, 2048, RATES, "cuda", baseline=0)
    found = shortfalls(plan, scratch_free=50e9, output_free=None, host_available=1e12, device_available=40e9,
                       config=run)
    assert [s.resource for s in found] == ["scratch disk", "device memory"]
    disk, device = found
    assert disk.needed == pytest.approx(plan.scratch + plan.output) and disk.available == 50e9
    assert any("--keep-every 0" in fix for fix in disk.fixes)
    assert any("--activation-dtype bfloat16" in fix for fix in disk.fixes)
    assert device.fixes[0] == "--offload-activations"
    assert not shortfalls(plan, scratch_free=1e13, output_free=None, host_available=1e12, device_available=1e12,
                          config=run)
    assert isinstance(found[0], Shortfall) and "GB" in found[0].describe()


def test_a_run_that_does_not_fit_is_refused_before_any_work(tiny_llama):
    from tasks.planning.check import Available

    folder, _ = tiny_llama
    run = config(nsamples=4, seqlen=16)
    plan = plan_for(str(folder), run, rates=RATES, device="cpu", baseline=1e8)
    with pytest.raises(InsufficientResources, match="scratch disk needs .* GB available") as info:
        check_plan(plan, run, Available(scratch_free=1e3, output_free=None, host=1e12, device=None))
    assert "--cache-dir on a disk" in str(info.value) and "--no-resource-check" in info.value.fix
    assert check_plan(plan, run, Available(scratch_free=1e12, output_free=None, host=1e12, device=None)) == []
