"""Block refinement: after a block's linear layers are pruned one by one, tune their kept weights together so
the block's output matches a target on the calibration inputs, the masks fixed.

Layer-wise pruning fits each matrix to its own dense output; the errors of the block's matrices then add up
through attention and the MLP's nonlinearity. Refinement minimises the block's relative output error

    ||f(X; W_hat) - Y||^2 / ||Y||^2,   Y the dense block's output on the same inputs X,

over the nonzero entries of every pruned linear weight W_hat, by a few epochs of Adam over the calibration
windows (``RefineSpec``: epochs, learning rate, windows per step). The norms and biases stay as they are; after
every step the pruned entries are set back to zero, so the sparsity pattern (count, N:M groups) is exactly
the solver's. With dense targets the target mixes in the dense model's output (``refinement_target``), as the
layers' targets do.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from ..config.prune import RefineSpec
from .capture import BlockInputs, run_block
from .records import RefinementRecord

__all__ = ["output_error", "refine_block", "refinement_target"]

logger = logging.getLogger(__name__)


def refinement_target(dense_on_inputs: torch.Tensor, dense_outputs: torch.Tensor | None,
                      target_mix: float) -> torch.Tensor:
    """The block's target output: the dense block's output on the block's own inputs, or with dense targets
    (``dense_outputs``, the dense block on the dense model's inputs) the same mix of the two the layers aim at."""
    if dense_outputs is None:
        return dense_on_inputs
    return torch.lerp(dense_on_inputs.to(torch.float32), dense_outputs.to(torch.float32), target_mix).to(
        dense_on_inputs.dtype)


def output_error(outputs: torch.Tensor, target: torch.Tensor, batch_size: int = 8) -> float:
    """||outputs - target||^2 / ||target||^2, summed in float64 batch by batch (the tensors may be stored in
    bf16, in host memory)."""
    num = den = 0.0
    for start in range(0, target.shape[0], batch_size):
        y = target[start:start + batch_size].to(torch.float64)
        num += float((outputs[start:start + batch_size].to(torch.float64) - y).square().sum())
        den += float(y.square().sum())
    return num / den if den > 0 else 0.0


def refine_block(block: nn.Module, inputs: BlockInputs, target: torch.Tensor, spec: RefineSpec, *, seed: int,
                 batch_size: int = 8) -> RefinementRecord:
    """Tune the kept weights of ``block``'s linear layers in place (masks fixed) toward ``target`` (nsamples,
    seqlen, hidden) on ``inputs``; ``seed`` orders the windows of each epoch. ``batch_size`` is for the
    error measured before (no gradients); the steps take ``spec.batch`` windows each."""
    started = time.perf_counter()
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    weights = [m.weight for m in linears]
    masks = [w.detach() != 0 for w in weights]  # the solver's supports
    trainable = {id(w) for w in weights}
    flags = [(p, p.requires_grad) for p in block.parameters()]  # restored afterwards
    with torch.no_grad():
        error_before = output_error(run_block(block, inputs, batch_size), target)
    scale = float(target.to(torch.float64).square().mean())  # so that the loss is the relative error
    for p, _ in flags:
        p.requires_grad_(id(p) in trainable)  # only the linear weights learn; norms and biases stay
    kwargs = _trackable(inputs.kwargs)
    optimiser = torch.optim.Adam(weights, lr=spec.lr)
    generator = torch.Generator().manual_seed(seed)
    steps = 0
    try:
        with torch.enable_grad():
            for epoch in range(spec.epochs):
                order = torch.randperm(inputs.nsamples, generator=generator)
                for start in range(0, inputs.nsamples, spec.batch):
                    rows = order[start:start + spec.batch]
                    out = block(_trackable(inputs.batch(rows)), **kwargs)  # (len(rows), seqlen, hidden)
                    out = out[0] if isinstance(out, tuple) else out
                    y = target[rows].to(out.device, torch.float32)
                    loss = (out - y).square().mean() / scale
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    with torch.no_grad():
                        for w, mask in zip(weights, masks):
                            w.mul_(mask)  # the pruned entries stay zero
                    steps += 1
                logger.debug("refine: epoch %d of %d, last loss %.5f", epoch + 1, spec.epochs, float(loss.detach()))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
    return RefinementRecord(error_before=error_before, steps=steps, seconds=time.perf_counter() - started)


def _trackable(value: Any) -> Any:
    """``value`` with every tensor made in inference mode (captured block keywords, for one) copied into a normal
    tensor, which autograd may save for the backward; other tensors as they are."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_trackable(item) for item in value)
    if isinstance(value, dict):
        return {key: _trackable(item) for key, item in value.items()}
    return value
