"""The Gram collector of tasks/blockwise/gram.py against H, mean and variance computed directly from each layer's
recorded inputs, on tiny random LLaMA and OPT blocks."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from alps_solver import LayerProblem, solve
from alps_solver.methods import method_names, needs_input_stats
from tasks.blockwise.capture import BlockInputs, capture_block_inputs
from tasks.blockwise.gram import collect_layer_problems, discover_groups
from tasks.blockwise.solve import prune_linears
from tasks.common.errors import AlpsError
from tasks.config.prune import SolverSpec
from tasks.model.adapters import ALL_LAYERS, build_block


@pytest.fixture(scope="module", params=["llama", "opt"])
def block_and_inputs(request, tmp_path_factory):
    torch.manual_seed(0)
    if request.param == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64))
    else:
        model = OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                         num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64))
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    tokens = torch.randint(0, 100, (5, 16), generator=torch.Generator().manual_seed(1))
    inputs = capture_block_inputs(folder, tokens, device=torch.device("cpu"), batch_size=2)
    return build_block(folder, 1, torch.float32, torch.device("cpu")), inputs


def recorded_inputs(block: nn.Module, inputs) -> dict[str, torch.Tensor]:
    """Every linear layer's inputs (tokens, d_in) from a plain forward over all samples, in float64."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [module.register_forward_pre_hook(
        lambda module, args, name=name: seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for name, module in block.named_modules() if isinstance(module, nn.Linear)]
    try:
        with torch.inference_mode():
            for start in range(inputs.hidden.shape[0]):  # one sample at a time: other batching than the collector
                block(inputs.hidden[start : start + 1], **inputs.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts).to(torch.float64) for name, parts in seen.items()}


def test_groups_are_layers_reading_the_same_input(block_and_inputs):
    block, inputs = block_and_inputs
    groups = discover_groups(block, inputs)
    if hasattr(block, "mlp"):
        assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    else:
        assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"],
                          ["fc1"], ["fc2"]]


@pytest.mark.parametrize("which", ["all", "first group", "middle group", "a member without its leader"])
def test_problems_match_the_recorded_inputs(block_and_inputs, which):
    block, inputs = block_and_inputs
    groups = discover_groups(block, inputs)
    names = {"all": [n for g in groups for n in g], "first group": groups[0], "middle group": groups[2],
             "a member without its leader": [groups[0][1]]}[which]
    reference = recorded_inputs(block, inputs)
    ran: list[str] = []
    handles = [module.register_forward_hook(lambda *_, name=name: ran.append(name))
               for name, module in block.named_modules() if isinstance(module, nn.Linear)]
    try:
        problems = collect_layer_problems(block, inputs, names, batch_size=2, gram_dtype=torch.float64,
                                          groups=groups)
    finally:
        for handle in handles:
            handle.remove()
    assert list(problems) == names
    for name, problem in problems.items():
        X = reference[name]
        assert torch.allclose(problem.gram, X.T @ X, rtol=1e-9, atol=1e-9), name
        # batch means in float32, combined in float64
        assert torch.allclose(problem.input_mean, X.mean(dim=0), rtol=1e-5, atol=1e-6), name
        assert torch.allclose(problem.input_var, X.var(dim=0, unbiased=False), rtol=1e-5, atol=1e-6), name
        assert problem.n_tokens == X.shape[0]
        assert torch.equal(problem.weight, dict(block.named_modules())[name].weight)
    # Each batch's forward stops at the last watched group's input: only the layers before it run.
    order = [n for g in groups for n in g]
    last_watched = [g[0] for g in groups if set(g) & set(names)][-1]
    assert ran == order[: order.index(last_watched)] * 3  # 5 samples in batches of 2


def test_without_input_stats_the_same_problems_carry_no_mean_or_variance(block_and_inputs):
    block, inputs = block_and_inputs
    groups = discover_groups(block, inputs)
    names = [n for g in groups for n in g]
    full = collect_layer_problems(block, inputs, names, batch_size=2, gram_dtype=torch.float64, groups=groups)
    lean = collect_layer_problems(block, inputs, names, batch_size=2, gram_dtype=torch.float64, groups=groups,
                                  input_stats=False)
    for name in names:
        assert lean[name].input_mean is None and lean[name].input_var is None
        assert torch.equal(lean[name].gram, full[name].gram)
        assert lean[name].n_tokens == full[name].n_tokens


def test_dense_targets_collect_the_cross_gram_of_pruned_and_dense_inputs(block_and_inputs):
    """Block inputs whose dense-model hidden states differ from the pruned model's: every problem's cross Gram
    is X_p^T X_d of the layer inputs recorded from the two forwards, beside the same H as without them; with a
    pruned block the dense inputs come from the dense block handed in. With a target mix a it is X_p^T X_t for
    the mixed inputs X_t."""
    block, inputs = block_and_inputs
    drifted = replace(inputs, dense=inputs.hidden.clone(),
                      hidden=inputs.hidden + 0.1 * torch.randn(inputs.hidden.shape, generator=torch.Generator()
                                                               .manual_seed(3)))
    groups = discover_groups(block, inputs)
    names = [n for g in groups for n in g]
    dense_block = copy.deepcopy(block)
    pruned = copy.deepcopy(block)
    for module in pruned.modules():
        if isinstance(module, nn.Linear):
            module.weight.data[:, ::2] = 0.0  # a partly pruned block: its layer inputs differ from the dense one's
    for current in (block, pruned):
        problems = collect_layer_problems(current, drifted, names, batch_size=2, gram_dtype=torch.float64,
                                          groups=groups, dense_block=dense_block)
        plain = collect_layer_problems(current, drifted, names, batch_size=2, gram_dtype=torch.float64, groups=groups)
        X_p, X_d = recorded_inputs(current, drifted), recorded_inputs(dense_block, drifted.dense_view())
        for name in names:
            assert torch.allclose(problems[name].cross, X_p[name].T @ X_d[name], rtol=1e-9, atol=1e-9), name
            assert torch.equal(problems[name].gram, plain[name].gram) and plain[name].cross is None
            assert not torch.allclose(problems[name].cross, problems[name].gram, rtol=1e-3)
        # A mix of the two targets, (1 - a) X_p W^T + a X_d W^T, is the target of X_t = (1 - a) X_p + a X_d.
        mixed = collect_layer_problems(current, drifted, names, batch_size=2, gram_dtype=torch.float64,
                                       groups=groups, dense_block=dense_block, target_mix=0.3)
        for name in names:
            X_t = 0.7 * X_p[name] + 0.3 * X_d[name]
            assert torch.allclose(mixed[name].cross, X_p[name].T @ X_t, rtol=1e-9, atol=1e-9), name
            assert torch.equal(mixed[name].gram, problems[name].gram)


@pytest.mark.parametrize("method", method_names())
def test_methods_that_do_not_ask_for_input_stats_solve_without_them(method):
    torch.manual_seed(0)
    X = torch.randn(64, 16)
    bare = LayerProblem(weight=torch.randn(8, 16), gram=X.T @ X)
    if needs_input_stats(method):
        with pytest.raises(ValueError, match="input_mean"):
            solve(bare, "0.5", method=method)
    else:
        assert solve(bare, "0.5", method=method).weight.shape == (8, 16)
    with pytest.raises(ValueError, match="method='nope' is unknown"):
        needs_input_stats("nope")


@pytest.mark.parametrize("method", ["alps", "dsnot"])
def test_prune_linears_collects_input_stats_only_for_methods_that_read_them(block_and_inputs, method):
    block, inputs = block_and_inputs
    seen: dict[str, LayerProblem] = {}

    def record(problems, group_of, patterns):
        seen.update(problems)
        return {name: (None, problem.weight) for name, problem in problems.items()}  # weights unchanged

    prune_linears(block, inputs, SolverSpec(method=method, pattern="0.5"), batch_size=2, solve_stage=record)
    assert seen and all((p.input_mean is not None) == (method == "dsnot") for p in seen.values())
    assert all((p.input_var is not None) == (method == "dsnot") for p in seen.values())


class _Shifted(nn.Module):
    """A stand-in block whose linear layer sees inputs with means up to 10,000 times their spread."""

    def __init__(self, repeat: int = 1) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 3)
        self.repeat = repeat

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for _ in range(self.repeat):
            out = self.proj(hidden)
        return out


def test_variance_of_inputs_with_a_large_mean_is_accurate_with_a_float32_gram():
    generator = torch.Generator().manual_seed(3)
    offsets = torch.tensor([100.0, -300.0, 0.0, 50.0, 1000.0, 1.0])
    hidden = offsets + 0.1 * torch.randn(7, 16, 6, generator=generator)
    inputs = BlockInputs(hidden=hidden, keywords={ALL_LAYERS: {}}, device=torch.device("cpu"))
    problem = collect_layer_problems(_Shifted(), inputs, ["proj"], batch_size=3)["proj"]  # float32 H
    X = hidden.reshape(-1, 6).to(torch.float64)
    assert torch.allclose(problem.input_mean, X.mean(dim=0), rtol=1e-6, atol=1e-6)
    # E[x^2] - mean^2 from float32 sums would be off by far more than 0.1% here (mean^2 / var up to 1e8)
    assert torch.allclose(problem.input_var, X.var(dim=0, unbiased=False), rtol=1e-3)


def test_a_linear_layer_called_twice_per_forward_is_refused():
    inputs = BlockInputs(hidden=torch.randn(2, 4, 6), keywords={ALL_LAYERS: {}}, device=torch.device("cpu"))
    with pytest.raises(AlpsError, match="runs more than once in one forward"):
        discover_groups(_Shifted(repeat=2), inputs)
