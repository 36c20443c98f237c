"""The Prefect tasks of the pruning flow (``flows/prune.py``): thin wrappers over ``tasks.blockwise``.

Each task is the cached, logged form of the library step of the same name (``tasks.blockwise.steps``,
``tasks.model.prepared``). Caching and resume: ``capture_calibration`` and ``solve_block`` are cached under the
keys of the run's block chain (``tasks.blockwise.chain``), with their records kept in the run's cache folder.
``plan_run`` reads those records before anything runs and decides which links are reused, replayed or solved;
``calibrate`` and ``solve_block_link`` then run one planned link each. A block's layer solves run in the
block's own process, or, with more than one worker or another task runner, as ``solve-from-file`` tasks on a
Prefect task runner (a thread pool, Dask or Ray): their problems travel as files, never as pickled tensors,
and the weights are the same as in process.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from alps_solver import LayerProblem, SparsityPattern

from .blockwise import steps
from .blockwise.allocation import Allocation, allocate_sparsity, measure_blocks
from .blockwise.chain import BlockChain, Link, is_kept, plan_chain, run_keys
from .blockwise.export import release_activations as delete_activations
from .blockwise.export import saved_earlier, write_pruned_model
from .blockwise.group_files import load_group, save_group
from .blockwise.records import BlockResult, CalibrationResult, FileRecord, LayerReport
from .blockwise.report import PruneReport
from .blockwise.solve import Solved, SolveStage, by_group, solve_group
from .blockwise.steps import StaleInputs
from .common.errors import SettingError
from .common.files import remove_dead_temporaries
from .common.locks import entry_lock
from .config.prune import PruneConfig, RuntimeConfig, SolverSpec
from .data.sampling import calibration_text_hash, cap_seqlen
from .model.loading import resolve_device
from .model.prepared import PreparedModel
from .model.prepared import prepare_model as prepare
from .model.structure import plan_structure
from .orchestration import cached_in, cached_result, key_parameter, run_logger, task
from .planning.check import available, check_plan, plan_for, shape_of
from .planning.estimate import ResourcePlan

__all__ = [
    "BlockProgress",
    "allocate",
    "calibrate",
    "check_resources",
    "plan_run",
    "prepare_model",
    "release_activations",
    "release_superseded",
    "replay_block",
    "save_pruned_model",
    "solve_block_link",
    "threads_per_worker",
]

logger = logging.getLogger(__name__)

ALLOCATION_PARTS = "allocation-parts"  # where a cache folder keeps an unfinished allocation's measured blocks


@task(name="prepare-model")
def prepare_model(reference: str) -> PreparedModel:
    """Resolve the reference to a local safetensors folder with a fingerprint (hub: download once)."""
    return prepare(reference)


def check_resources(model: PreparedModel, config: PruneConfig, chain: BlockChain) -> ResourcePlan:
    """The run's resource plan, logged; a run that cannot fit the free disk, RAM or device memory is refused
    before any work (``InsufficientResources``), unless ``runtime.check_resources`` is off. What an earlier
    attempt already wrote to the cache folder (``chain``'s files) counts as available: a resume needs less."""
    plan = plan_for(model.reference, config, shape=shape_of(str(model.folder)))
    run_logger(logger).info(
        "plan: activations %.2f GB on disk (%d boundaries), pruned weights %.2f GB, output %.2f GB; peak RAM %.2f GB%s;"
        " about %.0f s per block, %.0f min in all", plan.activations / 1e9, plan.boundaries_on_disk,
        plan.pruned_weights / 1e9, plan.output / 1e9, plan.host / 1e9,
        f", device {plan.device_memory / 1e9:.2f} GB" if plan.device == "cuda" else "", plan.block_seconds,
        plan.seconds / 60)
    if config.runtime.check_resources:
        machine = available(config, plan.device)
        cache_dir = config.runtime.resolved_cache_dir()
        written = [steps.activation_path(cache_dir, link.key) for link in (chain.calibration, *chain.blocks)]
        written += [cache_dir / steps.BLOCKS / f"{link.key}.safetensors" for link in chain.blocks]
        credit = sum(path.stat().st_size for path in written if path.is_file())
        check_plan(plan, config, replace(machine, scratch_free=machine.scratch_free + credit))
    return plan


def plan_run(model: PreparedModel, config: PruneConfig) -> BlockChain:
    """The run's block chain, planned from what its cache folder already holds."""
    seqlen = cap_seqlen(config.calibration.seqlen, model.max_positions or None)
    text_hash = calibration_text_hash(config.calibration.dataset, config.runtime.data_dir)
    keys = run_keys(model, config, seqlen, text_hash)
    cache_dir = config.runtime.resolved_cache_dir()
    for folder in (steps.ACTIVATIONS, steps.BLOCKS):  # what a killed run was writing when it died
        remove_dead_temporaries(cache_dir / folder)
    chain = plan_chain(keys, cached_result(cache_dir, keys.calibration, CalibrationResult),
                       [cached_result(cache_dir, key, BlockResult) for key in keys.blocks])
    reused, replayed, computed = (chain.indices(action) for action in ("reuse", "replay", "compute"))
    run_logger(logger).info("%d of %d blocks cached%s; %d to solve", len(reused) + len(replayed), len(chain.blocks),
                            f" ({len(replayed)} replayed first: the inputs of the blocks after them are gone)"
                            if replayed else "", len(computed))
    return chain


# ------------------------------------------------------------------------------------------ calibration
@task(name="capture-calibration", persist_result=True, cache_key_fn=key_parameter)
def capture_calibration(key: str, model: PreparedModel, config: PruneConfig, seqlen: int,
                        cache_dir: Path) -> CalibrationResult:
    """Calibration windows through the stem: the inputs of block 0, saved as safetensors."""
    _use_threads(config.runtime.threads)
    started = time.perf_counter()
    result = steps.capture_calibration(key, model, config.calibration, seqlen, config.runtime, cache_dir)
    run_logger(logger).info("calibration: %d x %d tokens of %s in %.1f s", config.calibration.nsamples, seqlen,
                            config.calibration.dataset, time.perf_counter() - started)
    return result


def calibrate(link: Link, model: PreparedModel, config: PruneConfig, seqlen: int) -> CalibrationResult:
    """The calibration inputs cached under ``link``'s key, captured first if not cached (or refreshed)."""
    cache_dir = config.runtime.resolved_cache_dir()
    with entry_lock(cache_dir, link.key, "calibration", run_logger(logger)):  # another run may be capturing it
        link = _made_meanwhile(link, cache_dir)
        return cached_in(capture_calibration, cache_dir, link.refresh)(
            key=link.key, model=model, config=config, seqlen=seqlen, cache_dir=cache_dir)


# ------------------------------------------------------------------------------------------ allocation
@task(name="allocate-sparsity", persist_result=True, cache_key_fn=key_parameter)
def measure_allocation(key: str, model: PreparedModel, calibration: CalibrationResult,
                       config: PruneConfig) -> Allocation:
    """The sparsity allocation: the dense model run over the calibration inputs for what the method reads (the
    blocks' outlier ratios, or the layers' errors against sparsity), then every layer's sparsity."""
    _use_threads(config.runtime.threads)
    started = time.perf_counter()
    spec, runtime = config.solver.allocation, config.runtime

    def progress(index: int, seconds: float, reused: bool) -> None:
        done = "kept from a stopped run, run forward" if reused else "measured"
        run_logger(logger).info("allocation: block %02d %s in %.1f s", index, done, seconds)

    target = config.solver.pattern.sparsity
    parts = runtime.resolved_cache_dir() / ALLOCATION_PARTS / key  # removed by ``allocate`` once it is cached
    measured = measure_blocks(model, calibration.inputs, spec, target, device=runtime.device,
                              batch_size=runtime.batch_size, offload=runtime.offload_activations, parts=parts,
                              progress=progress)
    allocation = allocate_sparsity(key, spec, target, measured)
    allocation = allocation.model_copy(update={"seconds": time.perf_counter() - started})
    spread = allocation.block_sparsity
    run_logger(logger).info("allocation %s: block sparsities %.3f to %.3f, overall %.6f (target %s), in %.1f s",
                            spec.method, min(spread), max(spread), allocation.achieved, config.solver.pattern,
                            allocation.seconds)
    return allocation


def allocate(chain: BlockChain, model: PreparedModel, calibration: CalibrationResult,
             config: PruneConfig) -> Allocation | None:
    """The run's sparsity allocation, from the cache or measured now (None: uniform, every layer gets the
    pattern). Measuring needs the calibration inputs: captured again if a finished run released them."""
    if chain.allocation is None:
        return None
    cache_dir = config.runtime.resolved_cache_dir()
    with entry_lock(cache_dir, chain.allocation, "allocation", run_logger(logger)):
        cached = cached_result(cache_dir, chain.allocation, Allocation)
        if cached is not None:
            return cached
        if not calibration.inputs.is_intact():
            calibration = calibrate(Link(calibration.key, "replay"), model, config, calibration.seqlen)
        allocation = cached_in(measure_allocation, cache_dir, False)(key=chain.allocation, model=model,
                                                                     calibration=calibration, config=config)
        shutil.rmtree(cache_dir / ALLOCATION_PARTS / chain.allocation, ignore_errors=True)  # the result holds them
        return allocation


# ------------------------------------------------------------------------------------------ blocks
@task(name="solve-block", task_run_name="solve-block-{index:02d}", persist_result=True, cache_key_fn=key_parameter)
def solve_block(key: str, index: int, model: PreparedModel, inputs: FileRecord, solver: SolverSpec,
                runtime: RuntimeConfig, cache_dir: Path, sparsities: dict[str, float] | None = None) -> BlockResult:
    """Prune block ``index`` on its calibration inputs (to its allocated layer ``sparsities``, if any); save its
    tensors and the next block's inputs."""
    _use_threads(runtime.threads)
    solve_stage = None
    if runtime.solve_workers > 1 or runtime.task_runner != "threads":
        # The runner only changes where the solves run, not their results: it is not part of the key.
        solve_stage = _solve_on_runner(Path(cache_dir) / "layers" / key, solver, runtime)
    result = steps.solve_block(key, index, model, inputs, solver, runtime, cache_dir, solve_stage, sparsities)
    run_logger(logger).info("block %02d: mean error %.5f, iterations %d, %.1f s, peak memory %.0f MB", index,
                            result.mean_rel_error, sum(layer.iterations for layer in result.layers), result.seconds,
                            max(result.memory.values()))
    return result


def solve_block_link(link: Link, model: PreparedModel, calibration: CalibrationResult, blocks: list[BlockResult],
                     config: PruneConfig, allocation: Allocation | None = None) -> BlockResult:
    """Block ``link.index`` from the cache, replayed, or solved on its inputs: the outputs of the last of
    ``blocks`` (the blocks before it, in order), or the calibration inputs for block 0; solved to its layer
    sparsities in ``allocation`` when there is one.

    The chain was planned so that those inputs exist. If they vanished since (another run on the same cache
    folder released them), they are rebuilt by replaying the blocks before it from the last inputs still
    intact; the replays write the same files, since every step is deterministic.
    """
    inputs = blocks[-1].outputs if blocks else calibration.inputs
    sparsities = allocation.layers[link.index] if allocation is not None else None
    try:
        return _run_link(link, model, inputs, config, sparsities)
    except StaleInputs:
        run_logger(logger).warning("block %02d: its inputs vanished after the run was planned; replaying the "
                                   "blocks before it", link.index)
    return _run_link(link, model, _rebuild_inputs(link.index, model, calibration, blocks, config), config,
                     sparsities)


def release_superseded(blocks: list[BlockResult], runtime: RuntimeConfig) -> None:
    """Once the last of ``blocks`` is done, delete its inputs (the outputs of the block before it) unless that
    boundary is kept (``tasks.blockwise.chain.is_kept``) or every activation is (``keep_activations``)."""
    boundary = len(blocks) - 1
    if not _outlives_its_block(boundary, runtime):
        delete_activations([blocks[boundary - 1].outputs])


def _outlives_its_block(boundary: int, runtime: RuntimeConfig) -> bool:
    return runtime.keep_activations or is_kept(boundary, runtime.keep_every)


def _run_link(link: Link, model: PreparedModel, inputs: FileRecord, config: PruneConfig,
              sparsities: dict[str, float] | None = None) -> BlockResult:
    """Run one link of the chain, holding its cache entry against other runs on the same cache folder: a run
    that waited for another finds the block that run cached, and reuses it."""
    cache_dir = config.runtime.resolved_cache_dir()
    with entry_lock(cache_dir, link.key, f"block {link.index:02d}", run_logger(logger)):
        return _run_link_locked(link, model, inputs, config, cache_dir, sparsities)


def _made_meanwhile(link: Link, cache_dir: Path) -> Link:
    """``link``, or a reuse of its entry when another run on the cache folder made it after this run planned
    (this run waited for it on the entry's lock): intact calibration inputs, or a block's intact weights."""
    if link.action != "compute":
        return link
    if link.index is None:
        cached = cached_result(cache_dir, link.key, CalibrationResult)
        intact = cached is not None and cached.inputs.is_intact()
    else:
        cached = cached_result(cache_dir, link.key, BlockResult)
        intact = cached is not None and cached.weights.is_intact()
    return replace(link, action="reuse") if intact else link


def _run_link_locked(link: Link, model: PreparedModel, inputs: FileRecord, config: PruneConfig,
                     cache_dir: Path, sparsities: dict[str, float] | None) -> BlockResult:
    link = _made_meanwhile(link, cache_dir)
    if link.action == "replay":
        cached = cached_result(cache_dir, link.key, BlockResult)
        if cached is not None and cached.weights.is_intact():
            replayed = replay_block(cached, link.index, model, inputs, config.runtime, cache_dir,
                                    config.solver.targets)
            return replayed.model_copy(update={"cached": True})
        link = Link(link.key, "compute", link.index)  # its cached weights went missing since the plan: solve it
    state = cached_in(solve_block, cache_dir, link.refresh)(
        key=link.key, index=link.index, model=model, inputs=inputs, solver=config.solver, runtime=config.runtime,
        cache_dir=cache_dir, sparsities=sparsities, return_state=True)
    result = state.result()  # raises the task's exception
    cached = state.name == "Cached"
    if cached:
        run_logger(logger).info("block %02d: reused from cache (key %s)", link.index, link.key[:12])
    return result.model_copy(update={"cached": cached})


@task(name="replay-block", task_run_name="replay-block-{index:02d}", cache_policy=NO_CACHE)
def replay_block(result: BlockResult, index: int, model: PreparedModel, inputs: FileRecord, runtime: RuntimeConfig,
                 cache_dir: Path, targets: str = "layer") -> BlockResult:
    """Rebuild an already solved block's outputs by running its cached pruned weights forward (no solve)."""
    _use_threads(runtime.threads)
    return steps.replay_block(result, model, inputs, runtime, cache_dir, targets)


def _rebuild_inputs(index: int, model: PreparedModel, calibration: CalibrationResult, blocks: list[BlockResult],
                    config: PruneConfig) -> FileRecord:
    """The inputs of block ``index``, recomputed from the last intact inputs before it."""
    start = index
    while start > 0 and not blocks[start - 1].outputs.is_intact():
        start -= 1
    if start > 0:
        inputs = blocks[start - 1].outputs
    elif calibration.inputs.is_intact():
        inputs = calibration.inputs
    else:
        inputs = calibrate(Link(calibration.key, "replay"), model, config, calibration.seqlen).inputs
    for replayed in blocks[start:index]:
        previous = inputs
        inputs = _run_link(Link(replayed.key, "replay", replayed.index), model, inputs, config).outputs
        if replayed.index > start and not _outlives_its_block(replayed.index, config.runtime):
            delete_activations([previous])  # read by the replay just done: superseded, as in the main loop
    return inputs


class BlockProgress:
    """Progress over a run's blocks: a Prefect progress artifact and a log line with a bar and the time left."""

    WIDTH = 10  # so that the line fits an 80-column terminal beside the log's time and level

    def __init__(self, count: int) -> None:
        self.count, self.done, self.started = count, 0, time.perf_counter()
        self.artifact = create_progress_artifact(progress=0.0, key="prune-progress",
                                                 description=f"blocks pruned of {count}")

    def advance(self) -> None:
        self.done += 1
        update_progress_artifact(self.artifact, progress=100.0 * self.done / self.count)
        elapsed = time.perf_counter() - self.started
        left = elapsed / self.done * (self.count - self.done)
        filled = round(self.WIDTH * self.done / self.count)
        run_logger(logger).info("[%s%s] %d/%d blocks, %.0f s, %.0f s left", "#" * filled,
                                "-" * (self.WIDTH - filled), self.done, self.count, elapsed, left)


# ------------------------------------------------------------------------------------------ save
@task(name="save-pruned-model", cache_policy=NO_CACHE)
def save_pruned_model(model: PreparedModel, blocks: list[BlockResult], config: PruneConfig,
                      report: PruneReport) -> Path:
    """Write the pruned model as a save_pretrained folder, verify it, then move it into place atomically; a folder
    an earlier attempt of this run saved (stopped after its save) is kept as it is."""
    record = report.to_json()
    if not config.output.overwrite and saved_earlier(config.output.folder, record):
        output = Path(config.output.folder).resolve()
        run_logger(logger).info("%s already holds this run's pruned model (saved and verified by an earlier attempt "
                                "of it): kept", output)
        return output
    structure = None if config.solver.structured is None else plan_structure(
        AutoConfig.from_pretrained(model.folder), config.solver.structured)
    output = write_pruned_model(model, blocks, config.solver.pattern, record, config.output.folder, structure)
    run_logger(logger).info("pruned model saved to %s", output)
    return output


@task(name="release-activations", cache_policy=NO_CACHE)
def release_activations(records: list[FileRecord]) -> int:
    """Delete calibration activations once the model is saved (cached block results stay valid)."""
    return delete_activations(records)


# ------------------------------------------------------------------------------------------ parallel solves
def make_task_runner(runtime: RuntimeConfig):
    """A Prefect task runner with ``solve_workers`` workers (``runner_address``: an existing Dask or Ray
    cluster)."""
    kind, workers, address = runtime.task_runner, runtime.solve_workers, runtime.runner_address
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        # Threads inside one process by default: Dask worker processes each need the Prefect API, which a
        # temporary local server cannot give them; point `address` at a real cluster for processes on other
        # machines.
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "processes": False, "threads_per_worker": 1})
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise SettingError("task_runner", kind, "prefect-ray is not installed",
                               "pip install -e '.[ray]', or use threads or dask") from None
        return RayTaskRunner(address=address) if address else RayTaskRunner()
    raise SettingError("task_runner", kind, "unknown task runner", "use threads, dask or ray")


def threads_per_worker(runtime: RuntimeConfig) -> int | None:
    """CPU threads for each layer solve. Workers on this machine (a thread pool, Dask's local cluster of
    threads, a local Ray) share its threads: N workers get 1/N each, so concurrent solves do not
    oversubscribe the cores. Workers of a cluster at an address keep ``threads``."""
    if runtime.runner_address:
        return runtime.threads
    return max(1, (runtime.threads or torch.get_num_threads()) // runtime.solve_workers)


def worker_devices(device: torch.device) -> list[torch.device]:
    """The devices layer solves are spread over: every visible GPU for cuda, else the one device."""
    if device.type == "cuda" and device.index is None:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [device]


@task(name="solve-from-file", task_run_name="solve-{unit}", cache_policy=NO_CACHE)
def solve_from_file(unit: str, group: str, names: list[str], problem_path: Path, work: Path, solver: SolverSpec,
                    patterns: dict[str, str], device: str, threads: int | None = None) -> list[LayerReport]:
    """Solve layers of ``group`` (``unit``: the group, or the one layer of it this task solves) from their
    file, in ``names`` order, each to its pattern (text form), sharing what is derived from their H; write each
    pruned weight to ``work/<name>.solution.safetensors``."""
    _use_threads(threads)
    problems = load_group(problem_path, torch.device(device))
    solved = solve_group(group, {n: problems[n] for n in names}, solver,
                         {n: SparsityPattern.parse(patterns[n]) for n in names})
    for name, (_, weight) in solved.items():
        save_file({"weight": weight.contiguous().cpu()}, str(work / f"{name}.solution.safetensors"))
    return [report for report, _ in solved.values()]


def _solve_on_runner(work: Path, solver: SolverSpec, runtime: RuntimeConfig) -> SolveStage:
    """A ``SolveStage`` that submits one ``solve-from-file`` task per group of layers sharing H to a fresh task
    runner; when a stage has fewer groups than workers (a true-sequential stage is one group), one task per
    layer instead, so no worker idles (each such task derives H's factors itself)."""
    devices = worker_devices(resolve_device(runtime.device))
    threads, workers = threads_per_worker(runtime), runtime.solve_workers

    def solve_all(problems: dict[str, LayerProblem], group_of: dict[str, str],
                  patterns: dict[str, SparsityPattern]) -> dict[str, Solved]:
        work.mkdir(parents=True, exist_ok=True)
        units = [(group, group, members) for group, members in by_group(problems, group_of).items()]
        if len(units) < workers:
            units = [(name, group, [name]) for _, group, members in units for name in members]

        # Largest first (a solve costs about d_out d_in^2): with fewer workers than tasks, the longest
        # work then starts at once instead of running alone at the end.
        def cost(unit: tuple[str, str, list[str]]) -> int:
            return -sum(problems[n].d_out * problems[n].d_in ** 2 for n in unit[2])

        try:
            futures = []
            with make_task_runner(runtime) as runner:
                for position, (unit, group, members) in enumerate(sorted(units, key=cost)):
                    problem_path = work / f"{unit}.problems.safetensors"
                    save_group({n: problems[n] for n in members}, problem_path)
                    futures.append(runner.submit(solve_from_file, parameters={
                        "unit": unit, "group": group, "names": members, "problem_path": problem_path, "work": work,
                        "solver": solver, "patterns": {n: str(patterns[n]) for n in members},
                        "device": str(devices[position % len(devices)]), "threads": threads,
                    }))
                reports = {report.name: report for future in futures for report in future.result()}
            solved = {}
            for name in problems:
                with safe_open(str(work / f"{name}.solution.safetensors"), framework="pt") as handle:
                    weight = handle.get_tensor("weight")
                solved[name] = (reports[name], weight)
            return solved
        finally:
            shutil.rmtree(work, ignore_errors=True)

    return solve_all


def _use_threads(threads: int | None) -> None:
    """Set torch's CPU thread count for this task (None leaves torch's default)."""
    if threads:
        torch.set_num_threads(threads)
