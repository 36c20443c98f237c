"""Structured pruning end to end: whole neurons and heads out, a smaller model that transformers loads and that
computes what the pruned one did; the pattern, the least-squares baseline and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig, Phi3Config

from alps_solver import LayerProblem, SparsityPattern, solve
from flows.prune import prune_model
from tasks.common.errors import SettingError
from tasks.config.prune import PruneConfig
from tasks.config.structure import Structure
from tasks.model.structure import plan_structure

from .test_prune_flow import save_model, settings_for, tensors_of


def test_channel_groups_keep_whole_groups_n_of_every_m():
    pattern = SparsityPattern.parse("channels:2:3x4")
    assert str(pattern) == "channels:2:3x4" and pattern == SparsityPattern.parse("channel_groups(2, 3, 4)")
    scores = torch.zeros(2, 24)
    scores[:, 4:12] = 1.0  # groups 1 and 2 of the first block of three
    scores[:, 12:16] = 3.0  # group 3, first of the second block
    scores[:, 20:24] = 2.0  # group 5
    mask = pattern.select(scores)
    assert mask[0].reshape(6, 4).all(dim=1).tolist() == [False, True, True, True, False, True]
    assert pattern.violations(mask) == [] and int(mask.sum()) == pattern.kept_count(2, 24)
    assert pattern.violations(torch.ones(2, 24, dtype=torch.bool)) != []
    with pytest.raises(ValueError, match="divisible"):
        pattern.validate_shape(2, 20)


def test_wanda_ls_is_least_squares_on_wandas_support():
    torch.manual_seed(0)
    X = torch.randn(200, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)
    problem = LayerProblem.from_inputs(torch.randn(5, 12, dtype=torch.float64), X)
    config = {"damping": 0.0}
    for pattern in ("channels:0.5", "0.5"):
        plain, fitted = solve(problem, pattern, "wanda"), solve(problem, pattern, "wanda-ls", config)
        assert torch.equal(plain.mask, fitted.mask) and fitted.rel_error < plain.rel_error
        for row in range(5):  # each row: the direct least-squares solve on its kept inputs
            kept = fitted.mask[row]
            direct = torch.linalg.lstsq(X[:, kept], X @ problem.weight[row], driver="gelsd").solution
            assert torch.allclose(fitted.weight[row, kept], direct, atol=1e-6)


def test_the_plan_keeps_the_head_grouping_and_refuses_what_cannot_be_built():
    gqa = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    plan = plan_structure(gqa, Structure.parse("mlp:0.25,heads:0.5"))
    assert (plan.kept_neurons, plan.kept_heads, plan.kept_kv_heads) == (96, 2, 2)
    assert {n: str(p) for n, p in plan.patterns.items()} == {"mlp.down_proj": "channels:0.25",
                                                            "self_attn.o_proj": "channels:1:2x16"}
    mha = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
    assert plan_structure(mha, Structure(heads=0.25)).kept_kv_heads == 3
    with pytest.raises(SettingError, match="steps of 1/2"):
        plan_structure(gqa, Structure(heads=0.2))  # rounds to no head of a group of two
    with pytest.raises(SettingError, match="removes 0"):
        plan_structure(gqa, Structure(mlp=0.001))
    opt = OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4)
    with pytest.raises(SettingError, match="mlp:F"):
        plan_structure(opt, Structure(heads=0.25))
    with pytest.raises(SettingError, match="StructureRoles"):
        plan_structure(Phi3Config(hidden_size=64, intermediate_size=128, num_attention_heads=4), Structure(mlp=0.3))
    for text in ("mlp:1.2", "mlp:0", "attn:0.3", "mlp:0.3,mlp:0.2"):
        with pytest.raises(ValueError):
            Structure.parse(text)


def test_bad_combinations_are_refused_by_the_config(tmp_path):
    base = settings_for(tmp_path, tmp_path)
    with pytest.raises(ValueError, match="both given"):
        PruneConfig(**{**base, "solver": {**base["solver"], "structured": "mlp:0.3"}})
    solver = {k: v for k, v in base["solver"].items() if k != "pattern"}
    with pytest.raises(ValueError, match="cannot remove heads"):
        PruneConfig(**{**base, "solver": {**solver, "method": "sparsegpt", "structured": "heads:0.5"}})
    with pytest.raises(ValueError, match="uniform"):
        PruneConfig(**{**base, "solver": {**solver, "structured": "mlp:0.3", "allocation": {"method": "owl"}}})


@pytest.mark.parametrize(("kind", "structure", "method"), [("llama", "mlp:0.25,heads:0.5", "alps"),
                                                           ("opt", "mlp:0.5", "wanda-ls")])
def test_structured_prune_saves_a_smaller_model_that_computes_the_pruned_one(prefect_harness, tokenizer, tmp_path,
                                                                              kind, structure, method):
    model_dir = save_model(tmp_path / "model", tokenizer, kind)
    settings = settings_for(model_dir, tmp_path, method=method)
    settings["solver"] = {k: v for k, v in settings["solver"].items() if k != "pattern"} | {"structured": structure}
    result = prune_model(PruneConfig(**settings))
    output = result.output
    manifest = json.loads((output / "sparsity_manifest.json").read_text())
    small = AutoModelForCausalLM.from_pretrained(output)  # vanilla transformers, the smaller config
    plan = plan_structure(small.config.__class__.from_pretrained(model_dir), Structure.parse(structure))
    for key, value in plan.config_updates().items():
        assert getattr(small.config, key) == value
    assert manifest["parameters"]["after"] < manifest["parameters"]["before"]
    assert manifest["bytes"]["after"] < manifest["bytes"]["before"]
    assert small.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape == (1, 7)

    # Put the kept neurons and heads back into full-size zeros: the dense architecture then computes exactly what
    # the smaller model does, so nothing but silenced neurons and heads was removed.
    full = AutoModelForCausalLM.from_pretrained(model_dir)
    state, roles, d = full.state_dict(), plan.roles, plan.head_dim
    saved = tensors_of(output)
    for block in manifest["blocks"]:
        prefix = f"{'model.decoder' if kind == 'opt' else 'model'}.layers.{block['index']}."
        neurons = torch.tensor(block["neurons"])
        heads = torch.tensor([h * d + i for h in block["heads"] for i in range(d)])
        columns = {roles.mlp_output: neurons, roles.attention_output: heads}
        rows = {**{n: neurons for n in roles.mlp_inputs}, roles.queries: heads}
        for name in [n for n in saved if n.startswith(prefix)]:
            layer, _, suffix = name[len(prefix):].rpartition(".")
            if suffix == "weight" and layer in columns and saved[name].shape != state[name].shape:
                state[name] = torch.zeros_like(state[name]).index_copy_(1, columns[layer], saved[name])
            elif layer in rows and saved[name].shape != state[name].shape:
                state[name] = torch.zeros_like(state[name]).index_copy_(0, rows[layer], saved[name])
            else:
                state[name] = saved[name]
    full.load_state_dict(state)
    tokens = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        assert torch.allclose(full(tokens).logits, small(tokens).logits, atol=1e-4)
    report = json.loads((output / "prune_report.json").read_text())
    assert report["structure"]["kept_neurons"] == plan.kept_neurons
    assert {layer["name"] for block in report["blocks"] for layer in block["layers"]} == set(plan.patterns)
    again = prune_model(PruneConfig(**{**settings, "output": {**settings["output"], "overwrite": True}}))
    assert again.report.reused_blocks == [0, 1]  # resumable and cached like every prune
