"""The block chain: a run's cache keys, and how a run resumes from what an earlier one left in the cache.

A run is a chain of links: the calibration capture (the inputs of block 0), then block 0, block 1, ...
Each link's cache key hashes everything upstream of it, so a key names one exact result:

    calibration = (pipeline version, model fingerprint, calibration settings with the seqlen used, the hash of
                   the calibration text)
    allocation  = (pipeline version, the calibration's key, the allocation settings, the pattern), when the
                   sparsity is not spread uniformly
    block i     = (pipeline version, the key of block i-1 or of the calibration, the solver spec with the
                   method's full config and the allocation settings, i)

A block is *reusable* when its cached result exists and its weights file is intact: a reused block needs no
inputs. A block that must be solved needs its inputs, the outputs of the block before it; when those are gone
(released as the run advanced, or damaged), the chain walks back to the last link whose outputs are intact
(or to the calibration inputs) and replays forward from there: a replayed block runs its cached pruned weights
forward, it is never solved again. ``plan_chain`` decides all of this before anything runs, from the cached
results alone, so the flow is one loop over the planned links.

Scratch stays bounded: boundary ``b`` is the activations entering block ``b`` (boundary 0: the calibration
inputs, kept for the whole run as the root every replay can start from). Once block ``b`` is done, boundary
``b`` is superseded and deleted, unless it is one of every ``keep_every``-th kept to shorten replays
(``is_kept``). So at any moment a run holds the calibration inputs, the current block's inputs and outputs,
and the kept boundaries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

from ..common.files import stable_hash
from ..config.prune import PruneConfig, SolverSpec
from .records import BlockResult, CalibrationResult

if TYPE_CHECKING:  # imported for annotations only: loading transformers is slow
    from ..model.prepared import PreparedModel

__all__ = ["PIPELINE_VERSION", "Action", "BlockChain", "Link", "RunKeys", "is_kept", "plan_chain", "run_keys",
           "solver_identity"]

# Bump when a change to capture, block solving, reassembly or the layout of the cache keys and records changes
# results: it is part of every key, so older cache entries are recomputed, never misread.
PIPELINE_VERSION = 3


@dataclass(frozen=True)
class RunKeys:
    calibration: str
    blocks: tuple[str, ...]
    seqlen: int  # the calibration window length the keys were made for
    allocation: str | None = None  # the sparsity allocation's, when it is not uniform


Action = Literal["reuse", "replay", "compute"]


@dataclass(frozen=True)
class Link:
    """One step of a run: the result cached under ``key``, reused, replayed (its cached pruned weights run
    forward again, because its outputs are needed and gone) or computed (nothing intact is cached)."""

    key: str
    action: Action
    index: int | None = None  # the block; None for the calibration capture

    @property
    def refresh(self) -> bool:
        """Whether a cached result must be recomputed rather than served."""
        return self.action != "reuse"


@dataclass(frozen=True)
class BlockChain:
    calibration: Link
    blocks: tuple[Link, ...]
    seqlen: int  # the calibration window length used: the configured one, capped by the model's context
    allocation: str | None = None  # the key of the sparsity allocation (None: uniform, nothing to compute)

    def indices(self, action: Action) -> list[int]:
        return [link.index for link in self.blocks if link.action == action]


def is_kept(boundary: int, keep_every: int) -> bool:
    """Whether the activations entering block ``boundary`` outlive that block: the calibration inputs (0)
    always, and every ``keep_every``-th boundary when ``keep_every`` is set."""
    return boundary == 0 or (keep_every > 0 and boundary % keep_every == 0)


def solver_identity(solver: SolverSpec) -> dict:
    """What of the solver spec decides the weights: the spec with the method's full config (defaults filled
    in) instead of the overrides the user typed, so two spellings of one config share their cache. Options
    added after the first release count only away from their defaults (layer targets, uniform allocation, no
    refinement), so the cache entries of runs made before them stay valid."""
    identity = solver.model_dump(mode="json", exclude={"method_config"})
    if solver.targets == "layer":
        del identity["targets"], identity["target_mix"]  # the mix changes nothing then
    if solver.allocation.method == "uniform":
        del identity["allocation"]  # its other settings change nothing then
    elif solver.allocation.method != "error":
        del identity["allocation"]["granularity"]  # only the error allocation reads it
    if solver.refine.method == "none":
        del identity["refine"]
    if solver.structured is None:
        del identity["structured"]
    else:
        del identity["pattern"]  # unused: the structure decides every pattern
    return {**identity, "config": asdict(solver.solver_config)}


def run_keys(model: PreparedModel, config: PruneConfig, seqlen: int, text_hash: str) -> RunKeys:
    """The cache keys of a run's calibration capture and of every block; ``seqlen`` is the window length used
    (the configured one capped by the model) and ``text_hash`` the hash of the calibration text."""
    calibration_settings = {**config.calibration.model_dump(mode="json"), "seqlen": seqlen}
    upstream = stable_hash("calibration", PIPELINE_VERSION, model.fingerprint, calibration_settings, text_hash)
    calibration, blocks = upstream, []
    solver = solver_identity(config.solver)
    allocation = None
    if config.solver.allocation.method != "uniform":  # decided by the calibration inputs and its settings
        allocation = stable_hash("allocation", PIPELINE_VERSION, calibration, solver["allocation"],
                                 str(config.solver.pattern))
    for index in range(model.num_layers):
        upstream = stable_hash("block", PIPELINE_VERSION, upstream, solver, index)
        blocks.append(upstream)
    return RunKeys(calibration=calibration, blocks=tuple(blocks), seqlen=seqlen, allocation=allocation)


def plan_chain(keys: RunKeys, calibration: CalibrationResult | None,
               blocks: list[BlockResult | None]) -> BlockChain:
    """The links to run, given the results cached under ``keys`` (None: nothing cached): reusable blocks are
    reused, the others solved, and the blocks between a solved block and the last intact inputs before it
    replayed (recomputed for their outputs)."""
    count = len(keys.blocks)
    reusable = [block is not None and block.weights.is_intact() for block in blocks]
    actions: list[Action] = ["reuse" if ok else "compute" for ok in reusable]

    def inputs_intact(index: int) -> bool:
        if index == 0:
            return calibration is not None and calibration.inputs.is_intact()
        upstream = blocks[index - 1]
        return upstream is not None and upstream.outputs.is_intact()

    recapture = False
    for index in range(count):
        if reusable[index]:
            continue
        start = index
        # Walk back over reused blocks whose outputs are gone; a block that runs in this run writes fresh ones.
        while start > 0 and actions[start - 1] == "reuse" and not inputs_intact(start):
            start -= 1
        if start == 0 and not inputs_intact(0):
            recapture = True
        for replayed in range(start, index):
            actions[replayed] = "replay"
    if calibration is None:
        capture: Action = "compute"
    else:
        capture = "replay" if recapture else "reuse"
    return BlockChain(
        calibration=Link(keys.calibration, capture),
        blocks=tuple(Link(key, actions[i], index=i) for i, key in enumerate(keys.blocks)),
        seqlen=keys.seqlen,
        allocation=keys.allocation,
    )
