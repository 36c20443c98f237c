"""Block refinement (tasks/blockwise/refine.py) on tiny random LLaMA and OPT blocks pruned by the pipeline's own
layer solve: the block's output error falls, the masks and everything but the linear weights stay as they were,
the inputs are untouched, and a rerun with the same seed is bit-identical."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tasks.blockwise.capture import capture_block_inputs, run_block
from tasks.blockwise.refine import output_error, refine_block, refinement_target
from tasks.blockwise.solve import prune_linears
from tasks.config.prune import RefineSpec, SolverSpec
from tasks.model.adapters import build_block
from tests.conftest import build_tiny_model


@pytest.fixture(scope="module", params=["llama", "opt"])
def pruned_block(request, tmp_path_factory):
    """A dense block, the same block pruned to 70% with ALPS, its inputs and the dense block's outputs on them."""
    model = build_tiny_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    tokens = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(1))
    inputs = capture_block_inputs(folder, tokens, device=torch.device("cpu"), batch_size=4)
    dense = build_block(folder, 1, torch.float32, torch.device("cpu"))
    target = run_block(dense, inputs, 4)
    pruned = copy.deepcopy(dense)
    prune_linears(pruned, inputs, SolverSpec(method="alps", pattern="0.7"), batch_size=4)
    return dense, pruned, inputs, target


def _linear_weights(block: nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach().clone() for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def test_refinement_lowers_the_block_error_with_the_masks_fixed(pruned_block):
    _, pruned, inputs, target = pruned_block
    block = copy.deepcopy(pruned)
    hidden_before = inputs.hidden.clone()
    others_before = {n: p.detach().clone() for n, p in block.named_parameters() if not n.endswith("proj.weight")
                     and not n.endswith(("fc1.weight", "fc2.weight"))}
    weights_before = _linear_weights(block)
    flags_before = [p.requires_grad for p in block.parameters()]
    spec = RefineSpec(method="adam", epochs=20, lr=1e-3, batch=2)
    record = refine_block(block, inputs, target, spec, seed=0, batch_size=4)
    after = output_error(run_block(block, inputs, 4), target)

    assert record.steps == 20 * 4  # 8 windows, 2 per step
    assert record.error_before == pytest.approx(output_error(run_block(pruned, inputs, 4), target))
    assert after < 0.8 * record.error_before, (record.error_before, after)
    for name, weight in _linear_weights(block).items():
        kept = weights_before[name] != 0
        assert torch.equal(weight != 0, kept), name  # the same support: count, N:M groups, everything
        assert not torch.equal(weight, weights_before[name]), name  # and the kept weights did move
    for name, parameter in block.named_parameters():
        if name in others_before:
            assert torch.equal(parameter, others_before[name]), name  # norms and biases untouched
        assert parameter.grad is None
    assert [p.requires_grad for p in block.parameters()] == flags_before
    assert torch.equal(inputs.hidden, hidden_before)


def test_refinement_is_reproducible_and_its_seed_orders_the_windows(pruned_block):
    _, pruned, inputs, target = pruned_block
    spec = RefineSpec(method="adam", epochs=2, lr=1e-3, batch=3)
    runs = []
    for seed in (5, 5, 6):
        block = copy.deepcopy(pruned)
        refine_block(block, inputs, target, spec, seed=seed)
        runs.append(_linear_weights(block))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert not all(torch.equal(runs[0][n], runs[2][n]) for n in runs[0])


def test_the_target_and_the_error_by_hand():
    own = torch.tensor([[[1.0, 2.0]], [[0.0, 4.0]]])
    dense = torch.tensor([[[3.0, 2.0]], [[2.0, 0.0]]])
    assert refinement_target(own, None, 0.3) is own
    assert torch.allclose(refinement_target(own, dense, 0.25), torch.tensor([[[1.5, 2.0]], [[0.5, 3.0]]]))
    # ||(1, 2, 0, 4) - (1, 0, 0, 4)||^2 / ||(1, 0, 0, 4)||^2 = 4 / 17, summed across batches of one sample
    outputs = torch.tensor([[[1.0, 2.0]], [[0.0, 4.0]]])
    target = torch.tensor([[[1.0, 0.0]], [[0.0, 4.0]]])
    assert output_error(outputs, target, batch_size=1) == pytest.approx(4 / 17)


@pytest.mark.parametrize(("settings", "field"), [({"method": "sgd"}, "method"), ({"epochs": 3}, "epochs"),
                                                 ({"method": "adam", "lr": 0.0}, "lr"),
                                                 ({"method": "adam", "batch": 0}, "batch")])
def test_bad_refine_settings_raise_naming_the_field(settings, field):
    with pytest.raises(ValueError, match=field):
        RefineSpec(**settings)
