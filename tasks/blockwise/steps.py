"""The steps a run repeats, from files to files: capture the calibration inputs of block 0; solve one block
(load it from the checkpoint, prune its linear layers, optionally refine them together, run it for the next
block's inputs, save both; with dense targets the dense block also runs on the dense model's inputs, and the
next inputs carry both); and
replay one already solved block (run its saved, pruned weights forward to rebuild the next block's inputs,
solving nothing).

Each step writes its tensors atomically under the run's cache folder, named by the step's cache key, and
returns a small record pointing at them (``tasks.blockwise.records``). The Prefect tasks in ``tasks/prune.py``
cache these records; nothing here knows about Prefect.
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer

from alps_solver import SparsityPattern

from ..common.files import atomic_write
from ..config.prune import CalibrationConfig, RuntimeConfig, SolverSpec
from ..data.sampling import calibration_windows, tokens_sha256
from ..model.adapters import adapter_for, block_layer_type, build_block, linear_names
from ..model.checkpoint import Checkpoint
from ..model.loading import resolve_device
from ..model.prepared import PreparedModel
from ..model.structure import plan_structure
from .capture import BlockInputs, capture_block_inputs, load_block_inputs, run_block, save_block_inputs
from .records import BlockResult, CalibrationResult, FileRecord
from .refine import output_error, refine_block, refinement_target
from .solve import SolveStage, prune_linears

__all__ = ["StaleInputs", "activation_path", "capture_calibration", "replay_block", "solve_block"]

logger = logging.getLogger(__name__)

ACTIVATIONS = "activations"  # where a cache folder keeps block inputs and outputs
BLOCKS = "blocks"  # where it keeps pruned block weights


class StaleInputs(Exception):
    """A step's input file is missing or does not match its recorded hash; the step that wrote it must rerun."""


def activation_path(cache_dir: Path, key: str) -> Path:
    """The activations file a step with cache ``key`` writes: the inputs of the block after it."""
    return Path(cache_dir) / ACTIVATIONS / f"{key}.safetensors"


def capture_calibration(key: str, model: PreparedModel, calibration: CalibrationConfig, seqlen: int,
                        runtime: RuntimeConfig, cache_dir: Path) -> CalibrationResult:
    """Calibration windows through the stem: the inputs of block 0, saved as safetensors."""
    tokenizer = AutoTokenizer.from_pretrained(model.folder)
    tokens = calibration_windows(calibration.dataset, tokenizer, nsamples=calibration.nsamples, seqlen=seqlen,
                                 seed=calibration.seed, data_dir=runtime.data_dir)
    inputs = capture_block_inputs(model.folder, tokens, device=resolve_device(runtime.device),
                                  batch_size=runtime.batch_size, dtype=getattr(torch, calibration.activation_dtype))
    path = atomic_write(activation_path(cache_dir, key), lambda p: save_block_inputs(p, inputs))
    return CalibrationResult(key=key, inputs=FileRecord.of(path), seqlen=seqlen, tokens=calibration.nsamples * seqlen,
                             tokens_sha256=tokens_sha256(tokens))


def solve_block(key: str, index: int, model: PreparedModel, inputs: FileRecord, solver: SolverSpec,
                runtime: RuntimeConfig, cache_dir: Path, solve_stage: SolveStage | None = None,
                sparsities: dict[str, float] | None = None) -> BlockResult:
    """Prune block ``index`` on its calibration inputs; save its tensors and the next block's inputs.
    ``solve_stage`` solves each stage's layer problems (default: in this process); ``sparsities`` are the block's
    layer sparsities from a sparsity allocation (default: the solver's pattern everywhere). With structured
    pruning (``solver.structured``) only the output projections are solved, to the structure's column patterns."""
    if not inputs.is_intact():
        raise StaleInputs(f"block {index}: input activations {inputs.path} are missing or damaged")
    started = time.perf_counter()
    device = resolve_device(runtime.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    block, block_inputs, prefix = _load_block(model, index, inputs, runtime, device)
    dense_outputs = _dense_outputs(block, block_inputs, solver.targets, runtime.batch_size)  # before any pruning
    target = None
    if solver.refine.method != "none":  # its target: the dense block on these inputs (mixed for dense targets)
        target = refinement_target(run_block(block, block_inputs, runtime.batch_size), dense_outputs,
                                   solver.target_mix)
    layers = prune_linears(block, block_inputs, solver, batch_size=runtime.batch_size, solve_stage=solve_stage,
                           patterns=layer_patterns(model, block, solver, sparsities))
    refinement = None
    if target is not None:
        refinement = refine_block(block, block_inputs, target, solver.refine, seed=index,
                                  batch_size=runtime.batch_size)

    stored = Checkpoint(model.folder).dtypes(prefix)  # the stored dtypes are kept on save
    tensors = {prefix + n: t.detach().to("cpu", stored[prefix + n]) for n, t in block.state_dict().items()}
    # The next block's inputs come from the weights as saved (rounded to the checkpoint's dtype, e.g. bf16): the
    # saved model computes exactly these, and a replay from the saved weights reproduces them bit for bit.
    block.load_state_dict({n[len(prefix):]: t for n, t in tensors.items()})
    outputs = run_block(block, block_inputs, runtime.batch_size)
    if refinement is not None:
        refinement = refinement.model_copy(update={"error_after": output_error(outputs, target)})
        logger.info("block %02d: refined in %.1f s (%d steps), output error %.4f -> %.4f", index,
                    refinement.seconds, refinement.steps, refinement.error_before, refinement.error_after)
    weights = atomic_write(Path(cache_dir) / BLOCKS / f"{key}.safetensors",
                           lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    next_inputs = atomic_write(activation_path(cache_dir, key),
                               lambda p: save_block_inputs(p, block_inputs, hidden=outputs, dense=dense_outputs))
    return BlockResult(key=key, index=index, weights=FileRecord.of(weights), outputs=FileRecord.of(next_inputs),
                       layers=layers, seconds=time.perf_counter() - started, memory=_memory_mb(device),
                       refinement=refinement)


def replay_block(result: BlockResult, model: PreparedModel, inputs: FileRecord, runtime: RuntimeConfig,
                 cache_dir: Path, targets: str = "layer") -> BlockResult:
    """Rebuild the outputs of an already solved block (``result``, from the cache) by running its saved pruned
    weights forward on its inputs (and, for dense ``targets``, its dense weights on the dense inputs); nothing
    is solved. The outputs are bit-identical to the ones the solve
    wrote when the device and batch size are the same (else equal up to float rounding)."""
    if not inputs.is_intact():
        raise StaleInputs(f"block {result.index}: input activations {inputs.path} are missing or damaged")
    if not result.weights.is_intact():
        raise StaleInputs(f"block {result.index}: its pruned weights {result.weights.path} are missing or damaged")
    started = time.perf_counter()
    target = resolve_device(runtime.device)
    block, block_inputs, prefix = _load_block(model, result.index, inputs, runtime, target)
    dense_outputs = _dense_outputs(block, block_inputs, targets, runtime.batch_size)  # the block is still dense
    with safe_open(str(result.weights.path), framework="pt") as handle:
        block.load_state_dict({name[len(prefix):]: handle.get_tensor(name) for name in handle.keys()})
    outputs = run_block(block, block_inputs, runtime.batch_size)
    next_inputs = atomic_write(activation_path(cache_dir, result.key),
                               lambda p: save_block_inputs(p, block_inputs, hidden=outputs, dense=dense_outputs))
    rebuilt = FileRecord.of(next_inputs)
    # Another device or batch size changes the outputs in float rounding: the cached record then no longer
    # matches them, and a later run replays this block again rather than trust a file it cannot check.
    same = rebuilt.sha256 == result.outputs.sha256
    logger.info("block %02d: replayed in %.1f s (outputs rebuilt from its pruned weights, %s)", result.index,
                time.perf_counter() - started, "bit-identical" if same else "equal up to float rounding")
    return result.model_copy(update={"outputs": rebuilt})


def layer_patterns(model: PreparedModel, block: torch.nn.Module, solver: SolverSpec,
                   sparsities: dict[str, float] | None) -> dict[str, SparsityPattern] | None:
    """The pattern of each layer of ``block`` to solve: a structure's (its output projections), an allocation's
    (every linear layer, each its own unstructured sparsity), or None: the solver's pattern everywhere."""
    if solver.structured is not None:
        return plan_structure(AutoConfig.from_pretrained(model.folder), solver.structured).patterns
    if sparsities is None:
        return None
    missing = sorted(set(linear_names(block)) - set(sparsities))
    if missing:
        raise KeyError(f"the sparsity allocation names no sparsity for the layers {missing}; it has "
                       f"{sorted(sparsities)}")
    return {name: SparsityPattern.unstructured(sparsity) for name, sparsity in sparsities.items()}


def _load_block(model: PreparedModel, index: int, inputs: FileRecord, runtime: RuntimeConfig,
                target: torch.device) -> tuple[torch.nn.Module, BlockInputs, str]:
    """Block ``index`` from the checkpoint in float32 on ``target``, its inputs (its layer type's keywords), and
    the checkpoint name prefix of its tensors."""
    config = AutoConfig.from_pretrained(model.folder)
    block = build_block(model.folder, index, torch.float32, target)
    block_inputs = load_block_inputs(inputs.path, target, offload=runtime.offload_activations)
    prefix = adapter_for(config).block_prefix(index)
    return block, block_inputs.for_layer_type(block_layer_type(config, index)), prefix


def _dense_outputs(block: torch.nn.Module, inputs: BlockInputs, targets: str, batch_size: int) -> torch.Tensor | None:
    """For dense targets, the dense block's outputs on the dense model's inputs: the next boundary's dense
    hidden states (run while ``block`` still holds its dense weights); None for layer targets."""
    if targets != "dense":
        return None
    return run_block(block, inputs.dense_view(), batch_size)


def _memory_mb(device: torch.device) -> dict[str, float]:
    memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        memory["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return memory
