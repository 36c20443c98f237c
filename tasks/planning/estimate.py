"""A run's resource plan: peak scratch disk, host RAM and device memory per phase, and its time, before it runs.

Every figure is a sum of named terms over the model's shapes (``tasks.planning.shapes``) and the run's settings,
written beside the code that allocates them:

- a *boundary* is one block's inputs or outputs: nsamples x seqlen x hidden in the activation dtype (twice that
  with dense targets, which keep the dense model's hidden states beside the pruned model's). The cache
  folder holds the calibration inputs, the current block's inputs and outputs and any kept boundaries
  (``tasks.blockwise.chain``), plus the pruned weights of the blocks done so far (the save copies them into
  the output);
- a block solve holds the block in float32, its inputs (and then its outputs) unless they are offloaded to the
  host, H in float64 for every group of the stage (and the cross Gram beside it with dense targets), and the
  largest layer's solver workspace; block refinement adds its target output and the optimiser's state;
- time is flops over the measured matmul rate (forwards, X^T X, the solver's iterations) plus ALPS's float64
  eigendecompositions at the measured eigh rate. ALPS's iteration count depends on the problem; the plan uses
  the counts typical of the bundled model's layers (stated below), so its times are estimates.

``plan_resources`` builds the plan; ``shortfalls`` compares it with what the machine has and says what to
change when something does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alps_solver.problem import gram_matrix_flops

from ..config.prune import PruneConfig, SolverSpec
from .rates import MachineRates
from .shapes import LinearShape, ModelShape

__all__ = ["PhaseEstimate", "ResourcePlan", "Shortfall", "plan_resources", "shortfalls"]

GB = 1e9
# ADMM iterations, rho updates and backsolve iterations per layer: the means over the bundled model's layers at
# 70% (alps: 32 iterations, 11 rho updates; alps-simple stops earlier). Other problems take more or fewer.
_TYPICAL_ADMM = {"alps": (33, 11), "alps-simple": (18, 6), "admm_fixed_rho": (60, 0), "admm_fixed_mask": (100, 0)}
_ALPS_FAMILY = set(_TYPICAL_ADMM)
STARTUP_SECONDS = 20.0  # imports and the temporary Prefect server, measured on a 2-core machine
_READ_BYTES_PER_SECOND = 1.0 * GB  # reading and casting checkpoint tensors (assumed)
_WRITE_BYTES_PER_SECOND = 0.5 * GB  # writing and verifying the output (assumed)


@dataclass(frozen=True)
class PhaseEstimate:
    name: str
    disk: float  # bytes of scratch disk (the cache folder) at the phase's peak
    host: float  # bytes of host RAM at the phase's peak (the process's own baseline included)
    device: float  # bytes of device memory at the phase's peak (equal to host on a CPU run)
    seconds: float  # the whole phase (every block, for the block phase)
    detail: str = ""


@dataclass(frozen=True)
class ResourcePlan:
    model: str
    device: str  # cpu or cuda
    shape: ModelShape
    boundary: float  # bytes of one boundary (a block's inputs or outputs)
    boundaries_on_disk: int  # at the peak
    output: float  # bytes of the pruned model's folder
    block_seconds: float  # one block, the mean
    phases: tuple[PhaseEstimate, ...]
    rates: MachineRates
    assumptions: tuple[str, ...] = field(default=())

    @property
    def scratch(self) -> float:
        """Peak bytes in the cache folder: activations and the pruned weights of the blocks done."""
        return max(phase.disk for phase in self.phases)

    @property
    def activations(self) -> float:
        """Peak bytes of activations in the cache folder: a few boundaries, whatever the depth."""
        return self.boundaries_on_disk * self.boundary

    @property
    def pruned_weights(self) -> float:
        """Bytes of pruned block weights the cache folder holds by the last block (the decoder, in its dtype)."""
        return self.shape.layers * self.shape.block_params * self.shape.checkpoint_bytes

    @property
    def host(self) -> float:
        return max(phase.host for phase in self.phases)

    @property
    def device_memory(self) -> float:
        return max(phase.device for phase in self.phases)

    @property
    def seconds(self) -> float:
        return STARTUP_SECONDS + sum(phase.seconds for phase in self.phases)

    def to_json(self) -> dict:
        return {"model": self.model, "device": self.device, "boundary_bytes": self.boundary,
                "boundaries_on_disk": self.boundaries_on_disk, "activation_bytes": self.activations,
                "pruned_weight_bytes": self.pruned_weights, "scratch_bytes": self.scratch,
                "host_bytes": self.host, "device_bytes": self.device_memory, "output_bytes": self.output,
                "block_seconds": self.block_seconds, "seconds": self.seconds,
                "rates": {"matmul_gflops": self.rates.matmul_gflops, "eigh_seconds_4096": self.rates.eigh_seconds,
                          "source": self.rates.source},
                "phases": [phase.__dict__ for phase in self.phases], "assumptions": list(self.assumptions)}


@dataclass(frozen=True)
class Shortfall:
    resource: str  # "scratch disk", "output disk", "host RAM", "device memory"
    needed: float
    available: float
    fixes: tuple[str, ...]

    def describe(self) -> str:
        return (f"{self.resource} needs {self.needed / GB:.1f} GB, {self.available / GB:.1f} GB available (fix: "
                + " or ".join(self.fixes) + ")")


def plan_resources(model: str, shape: ModelShape, config: PruneConfig, seqlen: int, rates: MachineRates,
                   device: str, baseline: float, output_shape: ModelShape | None = None) -> ResourcePlan:
    """The plan of pruning ``shape`` with ``config`` (calibration windows of ``seqlen`` tokens, the configured
    length capped by the model) on a ``device`` of type cpu or cuda; ``baseline`` is the process's own RAM
    (interpreter, torch, transformers, Prefect) before any model is loaded. ``output_shape`` is the saved
    model's when it differs (structured pruning writes a smaller one); by default ``shape``."""
    runtime, solver = config.runtime, config.solver
    tokens = config.calibration.nsamples * seqlen
    batch_tokens = min(runtime.batch_size, config.calibration.nsamples) * seqlen
    stream = tokens * shape.hidden * getattr(torch, config.calibration.activation_dtype).itemsize
    dense_targets = solver.targets == "dense"
    boundary = 2 * stream if dense_targets else stream  # the calibration inputs are one stream either way
    on_gpu = device == "cuda"
    offloaded = runtime.offload_activations or not on_gpu  # on a CPU run the host is the device

    # Scratch disk: boundaries at the peak (during the last block) and the pruned weights of every block.
    if runtime.keep_activations:
        boundaries = shape.layers + 1
    else:
        # During the last block: the calibration inputs, its inputs and outputs, and the kept boundaries before
        # its inputs (1 .. layers - 2).
        kept = max(shape.layers - 2, 0) // runtime.keep_every if runtime.keep_every else 0
        boundaries = min(3, shape.layers + 1) + kept  # a one-block model never holds a third
    block_stored = shape.block_params * shape.checkpoint_bytes
    weights_on_disk = shape.layers * block_stored

    # One batch through a block: the residual stream, attention's q/k/v/output and the MLP's widest
    # intermediates (gate, up and their product), in float32.
    widest = max(layer.d_out for layer in shape.linears)
    per_token = (6 * shape.hidden + 3 * widest) * 4
    batch_activations = batch_tokens * per_token

    # Calibration: the stem in float32 (embeddings, norm, lm_head and one placeholder block per layer type),
    # the stored tensors it is read from, and the captured hidden states (twice while they are concatenated).
    stem32 = (shape.stem_params + shape.kinds * shape.block_params) * 4
    calibration_host = baseline + stem32 + shape.stem_params * shape.checkpoint_bytes + 2 * stream
    calibration = PhaseEstimate(
        "calibration", disk=stream, host=calibration_host,
        device=(stem32 + batch_activations) if on_gpu else calibration_host,
        seconds=shape.stem_params * shape.checkpoint_bytes / _READ_BYTES_PER_SECOND,
        detail=f"{config.calibration.nsamples} x {seqlen} tokens through the stem")

    # A block: H for each group solved in one stage (all of them by default), the largest solver workspace.
    solved = _solved_groups(shape, solver)
    grams = [(16.0 if dense_targets else 8.0) * d * d for d in solved.values()]  # H (and K) in float64
    held_grams = max(grams) if solver.true_sequential else sum(grams)
    workspace = max(_workspace(solver.method, layer.d_out, layer.d_in) for layer in _solved_linears(shape, solver))
    block32 = shape.block_params * 4
    resident = 0.0 if offloaded and on_gpu else boundary  # the inputs on the device
    solve_peak = block32 + resident + held_grams + workspace + batch_activations
    output_peak = block32 + 2 * resident + batch_activations + block_stored  # outputs beside the saved tensors
    refine_target = 0.0
    if solver.refine.method != "none":
        # Block refinement holds the block's target output where its inputs are, through the solve, the refinement
        # and the outputs; while it refines, the gradients and Adam's two moments of every linear weight in
        # float32, and one step's windows kept for the backward (about twice one forward's intermediates).
        refine_target = stream
        step_activations = 2 * solver.refine.batch * seqlen * per_token
        on_device = 0.0 if offloaded and on_gpu else refine_target
        refine_peak = block32 + resident + on_device + 3 * shape.linear_params * 4 + step_activations
        solve_peak = max(solve_peak + on_device, refine_peak)
        output_peak += on_device
    device_peak = max(solve_peak, output_peak)
    if on_gpu:  # the stored tensors, and the activations in host memory (offloaded) or passing through it
        host_peak = baseline + block_stored + (2 * boundary + refine_target if offloaded else boundary)
    else:
        host_peak = baseline + max(solve_peak, output_peak)
    block_seconds = _block_seconds(shape, config, tokens, seqlen, rates)
    blocks = PhaseEstimate(
        "block solve", disk=boundaries * boundary + weights_on_disk, host=host_peak,
        device=device_peak if on_gpu else host_peak,
        seconds=shape.layers * block_seconds,
        detail=f"{shape.layers} blocks; H {held_grams / GB:.2f} GB, solver workspace {workspace / GB:.2f} GB")

    # Save: stream every tensor into the output folder and verify it; the scratch still holds the weights.
    # Tensors are read through memory maps, whose pages count in the process's RAM: the file being written
    # and verified, beside a block's worth of the originals and the pruned block files.
    output_bytes = (output_shape or shape).model_bytes
    save_host = baseline + shape.shard_bytes + 3 * block_stored
    save = PhaseEstimate(
        "save", disk=weights_on_disk + (boundaries - 1) * boundary, host=save_host,
        device=0.0 if on_gpu else save_host,
        seconds=2 * output_bytes / _WRITE_BYTES_PER_SECOND, detail=f"{output_bytes / GB:.2f} GB written")

    phases = (calibration, blocks, save)
    if solver.allocation.method != "uniform":
        phases = (calibration, _allocation_phase(shape, config, tokens, seqlen, rates, stream,
                                                 block32 + batch_activations, baseline, on_gpu), blocks, save)
    method = solver.method
    assumptions = [f"rates {rates.source}: {rates.matmul_gflops:.0f} GFLOP/s float32 matmul, "
                   f"{rates.eigh_seconds:.1f} s per float64 eigendecomposition of 4096"]
    if method in _TYPICAL_ADMM:
        iterations, updates = _TYPICAL_ADMM[method]
        assumptions.append(f"{method}: {iterations} ADMM iterations and {updates} rho updates per layer (typical "
                           "of the bundled model; the real count depends on the layer)")
    return ResourcePlan(model=model, device=device, shape=shape, boundary=boundary, boundaries_on_disk=boundaries,
                        output=output_bytes, block_seconds=block_seconds, phases=phases,
                        rates=rates, assumptions=tuple(assumptions))


def _allocation_phase(shape: ModelShape, config: PruneConfig, tokens: int, seqlen: int, rates: MachineRates,
                      stream: float, block_peak: float, baseline: float, on_gpu: bool) -> PhaseEstimate:
    """The dense model run block by block for the allocation, its boundaries in memory (inputs and outputs):
    OWL's one forward per block, or the error allocation's Gram collection (one partial pass per group), one
    group's H at a time and SparseGPT at every point of the error grid."""
    spec = config.solver.allocation
    forward = _forward_flops(shape, tokens, seqlen)
    if spec.method == "error":
        points = len(spec.error_grid(config.solver.pattern.sparsity))
        flops = ((len(shape.groups) + 1) / 2 + 1) * forward
        flops += sum(gram_matrix_flops(tokens, d) + 1.5 * float(d) ** 3 for d in shape.groups.values())
        flops += points * sum(float(layer.d_out) * layer.d_in ** 2 for layer in shape.linears)
        solve = max(8.0 * d * d for d in shape.groups.values()) + max(
            _workspace("sparsegpt", layer.d_out, layer.d_in) for layer in shape.linears)
        detail = f"{points} SparseGPT solves per layer on the dense model"
    else:
        flops, solve, detail = forward, 0.0, "one dense forward per block for the outlier ratios"
    load = _block_load_seconds(shape)
    device = block_peak + (0.0 if on_gpu and config.runtime.offload_activations else 2 * stream) + solve
    host = baseline + (device if not on_gpu else 2 * stream + shape.block_params * shape.checkpoint_bytes)
    return PhaseEstimate("allocation", disk=stream, host=host, device=device if on_gpu else host,
                         seconds=shape.layers * (rates.matmul(flops) + load), detail=detail)


def _forward_flops(shape: ModelShape, tokens: int, seqlen: int) -> float:
    """One forward of a block over ``tokens``: 2 flops per weight per token plus causal attention (2 x seqlen x
    width per token)."""
    return 2.0 * tokens * shape.linear_params + 2.0 * tokens * seqlen * shape.attention_width


def _block_load_seconds(shape: ModelShape) -> float:
    """Reading one block's stored tensors."""
    return shape.block_params * shape.checkpoint_bytes / _READ_BYTES_PER_SECOND


def _workspace(method: str, d_out: int, d_in: int) -> float:
    """Bytes a method allocates beyond W and H while it solves one (d_out, d_in) layer."""
    square, rect = float(d_in) * d_in, float(d_out) * d_in
    if method in _ALPS_FAMILY:
        # The float64 eigendecomposition: a copy of H, its eigenvectors and LAPACK's workspace (about 36 bytes
        # per entry at its peak); then Hs, Q, (H + rho I)^-1 and a temporary in float32, and the iterates B, D,
        # V, Z with B0, B0 Hs and the masks (about 30 bytes per weight).
        return max(36 * square, 16 * square) + 30 * rect
    if method == "sparsegpt":
        return 12 * square + 12 * rect  # H and its inverse factor in float32; W, the errors and the mask
    return 16 * rect  # scores and the sort's indices


def _solved_linears(shape: ModelShape, solver: SolverSpec) -> tuple[LinearShape, ...]:
    """The layers a block solve solves: every linear, or with structured pruning its output projections alone."""
    if solver.structured is None:
        return shape.linears
    from ..model.adapters import ADAPTERS  # loads transformers: only structured plans need it

    roles = ADAPTERS[shape.model_type].structure
    names = {roles.mlp_output} if solver.structured.mlp else set()
    names |= {roles.attention_output} if solver.structured.heads else set()
    return tuple(layer for layer in shape.linears if layer.name in names)


def _solved_groups(shape: ModelShape, solver: SolverSpec) -> dict[str, int]:
    """Each solved group's H width, by the group's first layer."""
    return {layer.group: layer.d_in for layer in _solved_linears(shape, solver)}


def _block_seconds(shape: ModelShape, config: PruneConfig, tokens: int, seqlen: int, rates: MachineRates) -> float:
    solver = config.solver
    groups = len(shape.groups)
    # Forwards: the Gram collection (one pass, or one partial pass per group with true_sequential) and the
    # outputs.
    passes = (groups + 1) / 2 + 1 if solver.true_sequential else 2
    if solver.targets == "dense":  # the dense block on the dense inputs: beside the collection, and for its outputs
        passes *= 2
    forward = _forward_flops(shape, tokens, seqlen)
    if solver.refine.method != "none":
        # The dense block for the target, the error before, and per epoch a forward and a backward (about twice
        # a forward) over every window.
        passes += 2 + 3 * solver.refine.epochs
    solved = _solved_groups(shape, solver)
    flops = passes * forward + sum(gram_matrix_flops(tokens, d) for d in solved.values())
    if solver.targets == "dense":
        flops += sum(2.0 * tokens * d * d for d in solved.values())  # the cross Gram X_p^T X_d, full
    eigh = 0.0
    method = solver.method
    for layer in _solved_linears(shape, solver):
        d_out, d = layer.d_out, layer.d_in
        step = 2.0 * d_out * d * d  # one (d_out, d) x (d, d) product
        if method in _TYPICAL_ADMM:
            # B0 Hs once, one weight step per iteration, one H product per backsolve iteration, and a rebuilt
            # (H + rho I)^-1 (a d^3 product) per rho update.
            iterations, updates = _TYPICAL_ADMM[method]
            backsolve = getattr(solver.solver_config, "pcg_max_iter", 0) if method.startswith("alps") else 0
            flops += (1 + iterations + backsolve) * step + updates * float(d) ** 3
        elif method == "sparsegpt":
            flops += d_out * d * d  # the lazy column-block updates
    for d in solved.values():  # what a group's members share: one decomposition of H
        if method in _ALPS_FAMILY:
            eigh += rates.eigh(d)
        elif method == "sparsegpt":
            flops += 1.5 * float(d) ** 3  # Cholesky factor of H^-1 (factor, inverse, factor)
    load = _block_load_seconds(shape)
    return rates.matmul(flops) + eigh + load


def shortfalls(plan: ResourcePlan, *, scratch_free: float, output_free: float | None, host_available: float,
               device_available: float | None, config: PruneConfig) -> list[Shortfall]:
    """What does not fit: scratch and output disk (``output_free`` None when the output is on the scratch
    disk), host RAM and device memory (None on a CPU run), each with the settings that would make it fit."""
    runtime, calibration = config.runtime, config.calibration
    found: list[Shortfall] = []
    halve = calibration.activation_dtype == "float32"
    scratch_needed = plan.scratch + (plan.output if output_free is None else 0.0)
    if scratch_needed > scratch_free:
        fixes = [f"--cache-dir on a disk with {scratch_needed / GB:.0f} GB free"]
        if runtime.keep_activations:
            fixes.insert(0, "drop --keep-activations (the run then keeps only a few boundaries)")
        if runtime.keep_every:
            fixes.insert(0, "--keep-every 0 (fewer kept boundaries)")
        if halve:
            fixes.append(f"--activation-dtype bfloat16 (saves {plan.boundaries_on_disk * plan.boundary / 2 / GB:.1f}"
                         " GB)")
        found.append(Shortfall("scratch disk", scratch_needed, scratch_free, tuple(fixes)))
    if output_free is not None and plan.output > output_free:
        found.append(Shortfall("output disk", plan.output, output_free,
                               (f"--output on a disk with {plan.output / GB:.0f} GB free",)))
    memory_fixes = []
    if halve:  # the block's inputs and outputs at half the size
        memory_fixes.append(f"--activation-dtype bfloat16 (saves up to {plan.boundary / GB:.1f} GB)")
    if not config.solver.true_sequential:
        memory_fixes.append("--true-sequential (one group's H at a time)")
    memory_fixes.append("fewer --nsamples")
    if plan.host > host_available:
        found.append(Shortfall("host RAM", plan.host, host_available, tuple(memory_fixes)))
    if device_available is not None and plan.device_memory > device_available:
        fixes = ([] if runtime.offload_activations else ["--offload-activations"]) + memory_fixes
        found.append(Shortfall("device memory", plan.device_memory, device_available, tuple(fixes)))
    return found
