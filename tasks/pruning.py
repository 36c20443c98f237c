"""Prefect tasks of the pruning flow: prepare the model, capture calibration inputs, solve each block,
save the pruned model.

Caching and resume. Every cached task takes an explicit ``key`` that chains the upstream identity:
calibration = (model fingerprint, data set, nsamples, seqlen, seed); block i = (key of block i-1 or of
the calibration, method, full solver config and version, pattern, block options, i). Results are small
dicts persisted by Prefect under the cache folder; tensors live in safetensors files the tasks write
themselves, recorded with their size and sha256. A cached result whose files are missing or damaged is
recomputed (``refresh_cache``), and a block whose input activations are gone first recomputes the
block (or calibration) that produced them.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer

from alps_solver import SparsityPattern

from .adapters import adapter_for, build_block, decoder_layer_class, linear_names
from .blocks import prune_block
from .calibration import capture_block_inputs, load_block_inputs, run_block, save_block_inputs
from .checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, write_like
from .data import calibration_text_hash, calibration_windows, tokens_sha256
from .errors import AlpsError
from .logs import run_logger
from .models import ModelKind, load_model, resolve_device, resolve_model
from .parallel import make_task_runner, solve_with_runner, worker_devices
from .perplexity import cap_seqlen
from .prune_config import PIPELINE_VERSION, PruneConfig, stable_hash
from .remote import register_by_reference
from .storage import (
    PRUNE_REPORT_FILE, SPARSITY_MANIFEST_FILE, atomic_directory, atomic_write, atomic_write_json, cache_root,
    sha256_file,
)

__all__ = [
    "StaleInputs",
    "VerificationError",
    "prepare_model",
    "check_output_folder",
    "check_pattern_fits",
    "run_keys",
    "cached_in",
    "capture_calibration",
    "solve_block",
    "threads_per_worker",
    "prune_blocks",
    "prune_report",
    "save_pruned_model",
    "release_activations",
]

logger = logging.getLogger(__name__)


class StaleInputs(Exception):
    """A task's input file is missing or does not match its recorded hash; the producer must rerun."""


class VerificationError(RuntimeError):
    """The saved model breaks the pattern or changed a tensor that was not to be pruned."""


def _key_from_parameters(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return parameters["key"]


def cached_in(task_, store: Path, refresh: bool = False):
    """``task_`` with its results and cache records kept under ``store``, recomputed if ``refresh``.

    Keeping the records beside the files they point at means a cache folder is self-contained: another
    folder never serves a record whose files live elsewhere.
    """
    return task_.with_options(result_storage=Path(store) / "results", refresh_cache=refresh or None)


def store_folder(config: PruneConfig) -> Path:
    return Path(config.cache_dir or cache_root() / "runs").expanduser().resolve()


def _file_record(path: Path) -> dict[str, Any]:
    return {"path": str(path), "size": path.stat().st_size, "sha256": sha256_file(path)}


def file_is_intact(record: dict[str, Any]) -> bool:
    """True when the recorded file exists with its recorded size and sha256 (truncation, corruption)."""
    path = Path(record["path"])
    return path.is_file() and path.stat().st_size == record["size"] and sha256_file(path) == record["sha256"]


def _save_atomically(path: Path, write) -> dict[str, Any]:
    """Write a file atomically and return its record (path, size, sha256)."""
    return _file_record(atomic_write(path, write))


def use_threads(threads: int | None) -> None:
    """Set torch's CPU thread count for this task (None leaves torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def _memory_mb(device: torch.device) -> dict[str, float]:
    peak_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    memory = {"peak_rss_mb": peak_rss_kb / 1024}
    if device.type == "cuda":
        memory["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return memory


# ------------------------------------------------------------------------------------------ prepare
@task(name="prepare-model")
def prepare_model(reference: str) -> dict[str, Any]:
    """Resolve the reference to a local safetensors folder with a fingerprint (hub: download once)."""
    resolved = resolve_model(reference)
    if resolved.kind is ModelKind.HUB:
        from huggingface_hub import snapshot_download

        files = ["*.json", "*.model", "*.txt", "*.tiktoken"]
        folder = Path(snapshot_download(resolved.location, revision=resolved.revision,
                                        allow_patterns=files + ["*.safetensors"]))
        if not any(folder.glob("*.safetensors")):  # older repositories: PyTorch weights, converted below
            folder = Path(snapshot_download(resolved.location, revision=resolved.revision,
                                            allow_patterns=files + ["*.bin"]))
    else:
        folder = Path(resolved.location)
    config = AutoConfig.from_pretrained(folder)
    if not _is_canonical(folder, adapter_for(config)):
        folder = _canonical_copy(folder, resolved.fingerprint)
    return {
        "reference": reference,
        "folder": str(folder),
        "fingerprint": resolved.fingerprint,
        "model_type": config.model_type,
        "num_layers": int(config.num_hidden_layers),
        "max_positions": int(getattr(config, "max_position_embeddings", 0) or 0),
    }


def _is_canonical(folder: Path, adapter) -> bool:
    """Safetensors weights whose names are the ones transformers' own classes use (block 0 under the
    adapter's layers path), so blocks and the stem can be read by name."""
    if not ((folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file()):
        return False
    return any(name.startswith(adapter.block_prefix(0)) for name in Checkpoint(folder).names)


def _canonical_copy(folder: Path, fingerprint: str) -> Path:
    """Convert a checkpoint with other tensor names (e.g. OPT's ``decoder.*``) or ``.bin`` weights once,
    through transformers, into a cached safetensors folder; later runs reuse it."""
    destination = cache_root() / "canonical" / stable_hash(fingerprint)
    if (destination / "config.json").is_file():
        return destination
    run_logger(logger).info("converting %s once into a canonical safetensors folder at %s", folder, destination)
    model, tokenizer = load_model(str(folder), dtype=AutoConfig.from_pretrained(folder).dtype or torch.float32,
                                  device="cpu")
    with atomic_directory(destination) as temporary:
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
    return destination


def check_output_folder(config: PruneConfig) -> None:
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise AlpsError("output", str(output), "exists and is not a folder", "choose a folder path")
    if output.is_dir() and any(output.iterdir()) and not config.overwrite:
        raise AlpsError(
            "output", str(output), "the folder exists and is not empty",
            "choose a new folder, or pass --overwrite to replace it once the new model is complete",
        )


def check_pattern_fits(model: dict[str, Any], pattern: SparsityPattern) -> list[str]:
    """Every prunable linear of every block can carry ``pattern``; returns the linear names of a block."""
    config = AutoConfig.from_pretrained(model["folder"])
    adapter = adapter_for(config)
    layer_class, _ = decoder_layer_class(config)
    with torch.device("meta"):
        names = linear_names(layer_class(config, layer_idx=0))
    checkpoint = Checkpoint(Path(model["folder"]))
    for index in range(model["num_layers"]):
        for name in names:
            tensor_name = f"{adapter.block_prefix(index)}{name}.weight"
            file = checkpoint.weight_map[tensor_name]
            with safe_open(checkpoint.folder / file, framework="pt") as handle:
                d_out, d_in = handle.get_slice(tensor_name).get_shape()
            try:
                pattern.validate_shape(d_out, d_in)
            except ValueError as error:
                raise AlpsError("pattern", str(pattern), f"layer {tensor_name} ({d_out}x{d_in}): {error}",
                                "choose a pattern every layer can carry") from None
    return names


def run_keys(model: dict[str, Any], config: PruneConfig, seqlen: int) -> dict[str, Any]:
    """Cache keys of calibration and of every block, each chaining everything upstream of it: calibration
    = (model fingerprint, data set and the hash of its training text, nsamples, seqlen, seed)."""
    calibration = stable_hash("calibration", PIPELINE_VERSION, model["fingerprint"], config.calibration,
                              calibration_text_hash(config.calibration, config.data_dir), config.nsamples, seqlen,
                              config.seed)
    solver = {
        "method": config.method,
        "config": config.solver_config(),
        "pattern": config.pattern,
        "true_sequential": config.true_sequential,
        "gram_dtype": config.gram_dtype,
    }
    blocks, upstream = [], calibration
    for index in range(model["num_layers"]):
        upstream = stable_hash("block", PIPELINE_VERSION, upstream, solver, index)
        blocks.append(upstream)
    return {"calibration": calibration, "blocks": blocks, "solver": solver}


def effective_seqlen(model: dict[str, Any], config: PruneConfig) -> int:
    """The calibration window length: ``config.seqlen`` capped at the model's maximum positions."""
    return cap_seqlen(config.seqlen, model["max_positions"] or None)


# ------------------------------------------------------------------------------------------ capture
@task(name="capture-calibration", persist_result=True, cache_key_fn=_key_from_parameters)
def capture_calibration(
    key: str, model: dict[str, Any], calibration: str, nsamples: int, seqlen: int, seed: int,
    data_dir: str | None, device: str, batch_size: int, store: str, threads: int | None = None,
) -> dict[str, Any]:
    """Calibration windows through the stem: the inputs of block 0, saved as safetensors."""
    use_threads(threads)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model["folder"])
    tokens = calibration_windows(calibration, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                 data_dir=data_dir)
    inputs = capture_block_inputs(Path(model["folder"]), tokens, device=resolve_device(device),
                                  batch_size=batch_size)
    path = Path(store) / "activations" / f"{key}.safetensors"
    record = _save_atomically(path, lambda p: save_block_inputs(p, inputs.hidden, inputs.kwargs))
    run_logger(logger).info("calibration: %d x %d tokens of %s in %.1f s", nsamples, seqlen, calibration,
                time.perf_counter() - started)
    return {"inputs": record, "tokens": nsamples * seqlen, "tokens_sha256": tokens_sha256(tokens)}


# ------------------------------------------------------------------------------------------ blocks
@task(name="solve-block", task_run_name="solve-block-{index:02d}", persist_result=True,
      cache_key_fn=_key_from_parameters)
def solve_block(
    key: str, index: int, model: dict[str, Any], inputs: dict[str, Any], solver: dict[str, Any],
    batch_size: int, device: str, store: str, threads: int | None = None, parallel: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Prune block ``index`` on its calibration inputs; save its tensors and the next block's inputs."""
    use_threads(threads)
    if not file_is_intact(inputs):
        raise StaleInputs(f"block {index}: input activations {inputs['path']} are missing or damaged")
    started = time.perf_counter()
    target = resolve_device(device)
    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target)
    folder = Path(model["folder"])
    block = build_block(folder, index, torch.float32, target)
    block_inputs = load_block_inputs(Path(inputs["path"]), target)
    pattern = SparsityPattern.parse(solver["pattern"])
    solve_layers = None
    if parallel and (parallel["workers"] > 1 or parallel["runner"] != "threads"):
        # The runner only changes where the solves run, not their results: it is not part of the key.
        solve_layers = solve_with_runner(
            lambda: make_task_runner(parallel["runner"], parallel["workers"], parallel.get("address")),
            Path(store) / "layers" / key, pattern, solver["method"], solver["config"], worker_devices(target),
            threads_per_worker(threads, parallel), parallel["workers"],
        )
    reports = prune_block(
        block, block_inputs, pattern, solver["method"], solver["config"],
        true_sequential=solver["true_sequential"], batch_size=batch_size,
        gram_dtype=getattr(torch, solver["gram_dtype"]), solve_layers=solve_layers,
    )
    outputs = run_block(block, block_inputs, batch_size)

    prefix = adapter_for(AutoConfig.from_pretrained(folder)).block_prefix(index)
    stored = Checkpoint(folder).dtypes(prefix)  # the stored dtypes are kept on save
    tensors = {prefix + n: t.detach().to("cpu", stored[prefix + n]) for n, t in block.state_dict().items()}
    weights = _save_atomically(Path(store) / "blocks" / f"{key}.safetensors",
                               lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    next_inputs = _save_atomically(Path(store) / "activations" / f"{key}.safetensors",
                                   lambda p: save_block_inputs(p, outputs.cpu(), block_inputs.kwargs))
    seconds = time.perf_counter() - started
    memory = _memory_mb(target)
    mean_error = sum(r.rel_error for r in reports) / len(reports)
    run_logger(logger).info("block %02d: mean error %.5f, iterations %d, %.1f s, peak memory %.0f MB", index, mean_error,
                sum(r.iterations for r in reports), seconds, max(memory.values()))
    return {
        "index": index,
        "weights": weights,
        "outputs": next_inputs,
        "layers": [asdict(r) for r in reports],
        "seconds": seconds,
        "memory": memory,
    }


def threads_per_worker(threads: int | None, parallel: dict[str, Any]) -> int | None:
    """CPU threads for each layer solve. Workers on this machine (a thread pool, Dask's local cluster of
    threads, a local Ray) share its threads: N workers get 1/N each, so concurrent solves do not
    oversubscribe the cores. Workers of a cluster at an address keep ``threads``."""
    if parallel.get("address"):
        return threads
    return max(1, (threads or torch.get_num_threads()) // parallel["workers"])


def _call_block(index: int, key: str, model: dict[str, Any], inputs: dict[str, Any], config: PruneConfig,
                solver: dict[str, Any], store: Path, refresh: bool) -> tuple[dict[str, Any], bool]:
    """Run (or fetch from cache) one block; returns its result and whether it came from the cache."""
    task_ = cached_in(solve_block, store, refresh)
    state = task_(key=key, index=index, model=model, inputs=inputs, solver=solver,
                  batch_size=config.batch_size, device=config.device, store=str(store), threads=config.threads,
                  parallel={"runner": config.task_runner, "workers": config.solve_workers,
                            "address": config.runner_address},
                  return_state=True)
    result = state.result()  # raises the task's exception (e.g. StaleInputs)
    return result, state.name == "Cached"


def prune_blocks(model: dict[str, Any], calibration_task, config: PruneConfig, keys: dict[str, Any],
                 store: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every block in order, reusing cached blocks whose files are intact and recomputing the rest.

    ``calibration_task(refresh)`` returns the calibration result, recomputing it when asked. Returns the
    calibration result in use and one result per block.
    """
    count = model["num_layers"]
    progress = create_progress_artifact(progress=0.0, key="prune-progress",
                                        description=f"blocks pruned of {count}")
    calibration = calibration_task(False)
    results: list[dict[str, Any]] = []

    def ensure(index: int, refresh: bool) -> dict[str, Any]:
        upstream = calibration["inputs"] if index == 0 else results[index - 1]["outputs"]
        try:
            result, cached = _call_block(index, keys["blocks"][index], model, upstream, config,
                                         keys["solver"], store, refresh)
        except StaleInputs:
            run_logger(logger).info("block %02d: its input activations are gone; recomputing what produced them", index)
            _refresh_upstream(index)
            return ensure(index, True)
        if cached and not file_is_intact(result["weights"]):
            run_logger(logger).warning("block %02d: cached weights %s are damaged; recomputing", index, result["weights"]["path"])
            return ensure(index, True)
        result["cached"] = cached
        if cached:
            run_logger(logger).info("block %02d: reused from cache (key %s)", index, keys["blocks"][index][:12])
        return result

    def _refresh_upstream(index: int) -> None:
        nonlocal calibration
        if index == 0:
            calibration = calibration_task(True)
        else:
            results[index - 1] = ensure(index - 1, True)

    started = time.perf_counter()
    for index in range(count):
        results.append(ensure(index, False))
        update_progress_artifact(progress, progress=100.0 * (index + 1) / count)
        done = index + 1
        eta = (time.perf_counter() - started) / done * (count - done)
        filled = round(20 * done / count)
        run_logger(logger).info("[%s%s] %d/%d blocks, about %.0f s left", "#" * filled, "-" * (20 - filled), done, count, eta)
    return calibration, results


def prune_report(model: dict[str, Any], config: PruneConfig, seqlen: int, blocks: list[dict[str, Any]],
                 calibration: dict[str, Any]) -> dict[str, Any]:
    """The run's record for prune_report.json: settings, the calibration windows used (count and sha256 of
    the token ids; None for a capture cached before the hash was recorded), and per block and layer what
    the solver did."""
    layers = [layer for block in blocks for layer in block["layers"]]
    return {
        "model": {k: model[k] for k in ("reference", "fingerprint", "model_type", "num_layers")},
        "config": {**config.model_dump(mode="json"), "seqlen_used": seqlen, "solver_config": config.solver_config()},
        "calibration": {"tokens": calibration.get("tokens"), "tokens_sha256": calibration.get("tokens_sha256")},
        "pipeline_version": PIPELINE_VERSION,
        "reused_blocks": [b["index"] for b in blocks if b.get("cached")],
        "computed_blocks": [b["index"] for b in blocks if not b.get("cached")],
        "seconds": sum(b["seconds"] for b in blocks),
        "mean_rel_error": sum(layer["rel_error"] for layer in layers) / max(len(layers), 1),
        "blocks": [
            {"index": b["index"], "seconds": b["seconds"], "memory": b["memory"], "cached": b.get("cached", False),
             "layers": b["layers"]}
            for b in blocks
        ],
    }


# ------------------------------------------------------------------------------------------ save
@task(name="save-pruned-model")
def save_pruned_model(model: dict[str, Any], blocks: list[dict[str, Any]], config: PruneConfig,
                      report: dict[str, Any]) -> str:
    """Write the pruned model as a save_pretrained folder, verify it, then move it into place atomically."""
    source = Path(model["folder"])
    output = Path(config.output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        for item in source.iterdir():
            if item.is_file() and not _is_weight_file(item.name):
                shutil.copy2(item, temporary / item.name)
        pruned_in = {}  # tensor name -> the block file holding its pruned value
        for block in blocks:
            with safe_open(block["weights"]["path"], framework="pt") as handle:
                pruned_in.update({name: block["weights"]["path"] for name in handle.keys()})

        def replacement(name: str) -> torch.Tensor | None:
            if name not in pruned_in:
                return None
            with safe_open(pruned_in[name], framework="pt") as handle:
                return handle.get_tensor(name)

        original = Checkpoint(source)
        write_like(original, temporary, replacement)
        manifest = _verify(original, Checkpoint(temporary), blocks, config.sparsity_pattern)
        atomic_write_json(temporary / SPARSITY_MANIFEST_FILE, manifest)
        atomic_write_json(temporary / PRUNE_REPORT_FILE, report)
        if output.exists():
            retired = output.with_name(f".{output.name}.{os.getpid()}.old")
            os.replace(output, retired)
            os.replace(temporary, output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(temporary, output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    run_logger(logger).info("pruned model saved to %s", output)
    return str(output)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


def _is_weight_file(name: str) -> bool:
    """Weight files (and their indexes) of any format: the output gets only the pruned safetensors."""
    return name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json")


def _verify(original: Checkpoint, saved: Checkpoint, blocks: list[dict[str, Any]],
            pattern: SparsityPattern) -> dict[str, Any]:
    """Every targeted layer meets the pattern and every other tensor is bit-identical to the original."""
    targeted: dict[str, dict[str, Any]] = {}
    for block in blocks:
        with safe_open(block["weights"]["path"], framework="pt") as handle:
            names = list(handle.keys())
        for layer in block["layers"]:
            full = next(n for n in names if n.endswith(f".{layer['name']}.weight"))
            targeted[full] = layer
    problems: list[str] = []
    tensors: dict[str, Any] = {}
    if sorted(saved.names) != sorted(original.names):
        problems.append("the saved tensor names differ from the original checkpoint's")
    for name, tensor in saved.iter_tensors():
        if name in targeted:
            issues = pattern.violations(tensor != 0)
            if issues:
                problems.append(f"{name}: {'; '.join(issues)}")
            tensors[name] = {"pattern": str(pattern), "shape": list(tensor.shape),
                             "sparsity": 1.0 - float((tensor != 0).sum()) / tensor.numel()}
        else:
            if not torch.equal(tensor, original.tensors([name])[name]):
                problems.append(f"{name}: changed although it is not a pruned layer")
    missing = sorted(set(targeted) - set(tensors))
    if missing:
        problems.append(f"pruned layers missing from the saved model: {missing[:5]}")
    if problems:
        raise VerificationError("the pruned model failed verification: " + " | ".join(problems[:10]))
    total = sum(t["shape"][0] * t["shape"][1] for t in tensors.values())
    zeros = sum(t["sparsity"] * t["shape"][0] * t["shape"][1] for t in tensors.values())
    return {"pattern": str(pattern), "targeted_sparsity": zeros / max(total, 1), "tensors": tensors}


@task(name="release-activations")
def release_activations(records: list[dict[str, Any]]) -> int:
    """Delete calibration activations once the model is saved (cached block results stay valid)."""
    removed = 0
    for record in records:
        path = Path(record["path"])
        if path.is_file():
            path.unlink()
            removed += 1
    return removed


register_by_reference(globals())  # Dask/Ray workers import these tasks and flows (see tasks/remote.py)
