"""Calibration capture (tasks/blockwise/capture.py): block-by-block forwards reproduce the full model's hidden
states, for models whose layers are all alike and for Gemma 3's mix of sliding and full attention; storage in
bf16 and on the host."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from tasks.blockwise.capture import (
    BlockInputs,
    capture_block_inputs,
    load_block_inputs,
    run_block,
    save_block_inputs,
)
from tasks.model.adapters import ALL_LAYERS, block_layer_type, build_block, layer_kinds

CPU = torch.device("cpu")


def gemma3(folder):
    torch.manual_seed(0)
    # A window of 8 tokens on 24-token samples: the sliding layers' mask differs from the full layers'.
    config = Gemma3TextConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                              sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2)
    model = Gemma3ForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


def llama(folder):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    model.save_pretrained(folder)
    return model


def blockwise_hidden_states(folder, model, inputs: BlockInputs, layer_type=block_layer_type) -> list[torch.Tensor]:
    states, current = [], inputs
    for index in range(model.config.num_hidden_layers):
        block = build_block(folder, index, torch.float32, CPU)
        hidden = run_block(block, current.for_layer_type(layer_type(model.config, index)), batch_size=2)
        states.append(hidden)
        current = BlockInputs(hidden=hidden, keywords=current.keywords, device=CPU)
    return states


@pytest.mark.parametrize("build", [llama, gemma3])
def test_block_by_block_equals_the_full_model(tmp_path, build):
    model = build(tmp_path)
    tokens = torch.randint(0, 100, (3, 24), generator=torch.Generator().manual_seed(1))
    inputs = capture_block_inputs(tmp_path, tokens, device=CPU, batch_size=2)
    assert sorted(inputs.keywords) == sorted(layer_kinds(model.config))
    with torch.no_grad():
        reference = model.model(input_ids=tokens, output_hidden_states=True).hidden_states
    states = blockwise_hidden_states(tmp_path, model, inputs)
    for index, hidden in enumerate(states[:-1]):  # the last entry of hidden_states is after the final norm
        torch.testing.assert_close(hidden, reference[index + 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.model.norm(states[-1]), reference[-1], rtol=1e-5, atol=1e-5)


def test_gemma3_blocks_need_their_own_layer_types_keywords(tmp_path):
    """Giving every block the first block's keywords (its sliding mask and local rotary table), as a capture of
    block 0 alone would, changes the full-attention blocks' outputs: the per-type keywords matter."""
    model = gemma3(tmp_path)
    assert layer_kinds(model.config) == ["sliding_attention", "full_attention"]
    tokens = torch.randint(0, 100, (3, 24), generator=torch.Generator().manual_seed(1))
    inputs = capture_block_inputs(tmp_path, tokens, device=CPU, batch_size=2)
    right = blockwise_hidden_states(tmp_path, model, inputs)
    wrong = blockwise_hidden_states(tmp_path, model, inputs, layer_type=lambda config, index: "sliding_attention")
    assert torch.equal(right[0], wrong[0])  # block 0 is a sliding block either way
    assert (right[1] - wrong[1]).abs().max() > 1e-3


def test_bf16_storage_on_the_host_round_trips_and_batches_are_float32(tmp_path):
    llama(tmp_path)
    tokens = torch.randint(0, 100, (5, 16), generator=torch.Generator().manual_seed(1))
    full = capture_block_inputs(tmp_path, tokens, device=CPU, batch_size=2)
    half = capture_block_inputs(tmp_path, tokens, device=CPU, batch_size=2, dtype=torch.bfloat16)
    assert half.hidden.dtype == torch.bfloat16 and torch.equal(half.hidden, full.hidden.to(torch.bfloat16))
    save_block_inputs(tmp_path / "inputs.safetensors", half)
    loaded = load_block_inputs(tmp_path / "inputs.safetensors", CPU, offload=True)
    assert torch.equal(loaded.hidden, half.hidden) and loaded.kwargs.keys() == full.kwargs.keys()
    assert list(loaded.keywords) == [ALL_LAYERS]
    batches = list(loaded.batches(2))
    assert [rows for rows, _ in batches] == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert all(hidden.dtype == torch.float32 for _, hidden in batches)
    block = build_block(tmp_path, 0, torch.float32, CPU)
    outputs = run_block(block, loaded, batch_size=2)
    assert outputs.dtype == torch.bfloat16  # stored like the inputs
    expected = run_block(block, full, batch_size=2)
    assert (outputs.float() - expected).abs().max() < 0.05 * expected.abs().max()
