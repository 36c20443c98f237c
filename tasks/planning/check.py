"""A run's plan against this machine: its free disks, RAM and device memory.

``plan_for`` makes the plan of a run from a model reference (anything ``--model`` takes, or a bare
``config.json``); ``available`` reads what the machine has; ``check_plan`` raises ``InsufficientResources``,
naming the numbers and the settings that would fit, when the run cannot fit.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import AutoConfig

from ..common.errors import AlpsError
from ..config.prune import PruneConfig
from ..data.sampling import cap_seqlen
from ..model.checkpoint import Checkpoint
from ..model.loading import resolve_device
from ..model.references import hub_error, locate_model
from .estimate import GB, ResourcePlan, Shortfall, plan_resources, shortfalls
from .rates import MachineRates, measure_rates
from .shapes import ModelShape, load_model_config, model_shape

__all__ = ["Available", "InsufficientResources", "available", "check_plan", "config_of", "plan_for", "shape_of"]


class InsufficientResources(AlpsError):
    """The run's plan does not fit the machine."""


@dataclass(frozen=True)
class Available:
    scratch_free: float  # bytes free on the cache folder's disk
    output_free: float | None  # bytes free on the output's disk; None when it is the cache folder's disk
    host: float  # bytes of RAM available to this process (what it holds now included)
    device: float | None  # bytes of free device memory; None on a CPU run


def config_of(reference: str) -> Any:
    """The Hugging Face config of a model reference, or a bare config.json (a hub id reads only its config)."""
    path = Path(reference).expanduser()
    if path.suffix == ".json" and path.is_file():
        return load_model_config(path)
    source = locate_model(reference)
    if not source.is_local:
        try:
            return AutoConfig.from_pretrained(source.location, revision=source.revision)
        except OSError as error:
            raise hub_error(source, error) from error
    return load_model_config(Path(source.location))


def shape_of(reference: str) -> ModelShape:
    """The shapes of a model reference, or of a bare config.json (a hub id reads only its config)."""
    config = config_of(reference)
    path = Path(reference).expanduser()
    source = None if path.suffix == ".json" and path.is_file() else locate_model(reference)
    if source is None or not source.is_local:
        return model_shape(config)
    folder = Path(source.location)
    checkpoint = Checkpoint(folder)
    stored = list(checkpoint.dtypes("").values())
    dtype = max(set(stored), key=stored.count) if stored else None
    largest = max(path.stat().st_size for path in checkpoint.files())
    return replace(model_shape(config, dtype), largest_file=largest)


def plan_for(reference: str, config: PruneConfig, *, shape: ModelShape | None = None,
             rates: MachineRates | None = None, device: str | None = None,
             baseline: float | None = None) -> ResourcePlan:
    """The plan of pruning ``reference`` with ``config``. ``rates`` default to this machine's (measured once);
    ``device`` (cpu or cuda) defaults to the run's; ``baseline`` to this process's RAM now."""
    shape = shape or shape_of(reference)
    target = device or resolve_device(config.runtime.device).type
    if rates is None:
        if target == "cuda" and not torch.cuda.is_available():
            raise AlpsError("device", target, "there is no GPU here to measure its rates on",
                            "give the GPU's rates (--matmul-gflops, --eigh-seconds) to plan for it from here")
        rates = measure_rates(resolve_device(config.runtime.device) if target != "cpu" else torch.device("cpu"),
                              config.runtime.threads)
    seqlen = cap_seqlen(config.calibration.seqlen, shape.max_positions or None)
    if baseline is None:  # the current RSS: a peak from before (or inherited across exec) would overstate it
        baseline = float(psutil.Process().memory_info().rss)
    return plan_resources(reference, shape, config, seqlen, rates, target, baseline,
                          output_shape=_output_shape(reference, config, shape))


def _output_shape(reference: str, config: PruneConfig, shape: ModelShape) -> ModelShape | None:
    """The saved model's shapes when structured pruning makes it smaller; None when it keeps ``shape``."""
    if config.solver.structured is None:
        return None
    from ..model.structure import plan_structure

    model_config = config_of(reference)
    for key, value in plan_structure(model_config, config.solver.structured).config_updates().items():
        setattr(model_config, key, value)
    return replace(model_shape(model_config), checkpoint_bytes=shape.checkpoint_bytes)


def available(config: PruneConfig, device: str) -> Available:
    """What this machine has for the run: free disk where the cache and the output go, RAM, device memory."""
    cache = _existing(config.runtime.resolved_cache_dir())
    output = _existing(Path(config.output.folder).expanduser().resolve())
    same_disk = os.stat(cache).st_dev == os.stat(output).st_dev
    return Available(
        scratch_free=float(shutil.disk_usage(cache).free),
        output_free=None if same_disk else float(shutil.disk_usage(output).free),
        host=_host_available() + float(psutil.Process().memory_info().rss),
        device=float(torch.cuda.mem_get_info(resolve_device(config.runtime.device))[0])
        if device == "cuda" and torch.cuda.is_available() else None,
    )


def check_plan(plan: ResourcePlan, config: PruneConfig, machine: Available) -> list[Shortfall]:
    """Raise ``InsufficientResources`` if the run does not fit ``machine``; returns the (empty) shortfalls."""
    found = shortfalls(plan, scratch_free=machine.scratch_free, output_free=machine.output_free,
                       host_available=machine.host, device_available=machine.device, config=config)
    if found:
        first = found[0]
        raise InsufficientResources(
            first.resource, f"{first.needed / GB:.1f} GB needed",
            "the run does not fit this machine: " + "; ".join(s.describe() for s in found),
            "change what is named above (`alps plan` shows the whole plan), or pass --no-resource-check to run "
            "anyway")
    return found


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (the disk it will be created on)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _host_available() -> float:
    """Bytes of RAM the system can still give without swapping."""
    return float(psutil.virtual_memory().available)
