"""``alps plan``: what a prune run will need of disk, RAM, device memory and time, before it starts.

The same plan is checked at the start of ``alps prune``; here it can also be made for another machine (a GPU
node, planned from a laptop) from given rates, and for a model known only by its ``config.json``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from tasks.common.errors import SettingError
from tasks.common.files import atomic_write_text
from tasks.config.prune import PruneConfig
from tasks.config.validation import spelled_as, validated

from .base import app, console, reports_user_errors
from .options import (
    ActivationDtypeOption,
    AllocationOption,
    AllocationSpreadOption,
    BatchSizeOption,
    CacheDirOption,
    DeviceOption,
    KeepActivationsOption,
    KeepEveryOption,
    MethodOption,
    NsamplesOption,
    OffloadActivationsOption,
    RefineBatchOption,
    RefineEpochsOption,
    RefineOption,
    SeqlenOption,
    TargetsOption,
    ThreadsOption,
)
from .prune import FLAGS

__all__ = ["plan_command"]

DEFAULT = PruneConfig()
GB = 1e9  # as tasks.planning.estimate counts; not imported from there, which would load torch for --help


@app.command("plan")
@reports_user_errors
def plan_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Anything --model of `alps prune` takes, or a bare "
                                       "config.json (e.g. Llama-3.1-70B's).")] = DEFAULT.model,
    method: MethodOption = DEFAULT.solver.method,
    pattern: Annotated[Optional[str], typer.Option("--pattern", help="'0.7', '2:4', ... (as for prune).",
                                                   show_default=False)] = None,
    structured: Annotated[Optional[str], typer.Option("--structured", metavar="mlp:F,heads:F", help="Plan a "
                                                      "structured prune (as for prune).", show_default=False)] = None,
    nsamples: NsamplesOption = DEFAULT.calibration.nsamples,
    seqlen: SeqlenOption = DEFAULT.calibration.seqlen,
    batch_size: BatchSizeOption = DEFAULT.runtime.batch_size,
    true_sequential: Annotated[bool, typer.Option("--true-sequential", help="Plan for --true-sequential.")]
    = DEFAULT.solver.true_sequential,
    targets: TargetsOption = DEFAULT.solver.targets,
    allocation: AllocationOption = DEFAULT.solver.allocation.method,
    allocation_spread: AllocationSpreadOption = DEFAULT.solver.allocation.spread,
    refine: RefineOption = DEFAULT.solver.refine.method,
    refine_epochs: RefineEpochsOption = DEFAULT.solver.refine.epochs,
    refine_batch: RefineBatchOption = DEFAULT.solver.refine.batch,
    activation_dtype: ActivationDtypeOption = DEFAULT.calibration.activation_dtype,
    offload_activations: OffloadActivationsOption = DEFAULT.runtime.offload_activations,
    keep_every: KeepEveryOption = DEFAULT.runtime.keep_every,
    keep_activations: KeepActivationsOption = DEFAULT.runtime.keep_activations,
    device: DeviceOption = DEFAULT.runtime.device,
    threads: ThreadsOption = DEFAULT.runtime.threads,
    cache_dir: CacheDirOption = DEFAULT.runtime.cache_dir,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where the pruned model would go (its disk is "
                                         "checked).")] = DEFAULT.output.folder,
    matmul_gflops: Annotated[Optional[float], typer.Option(
        "--matmul-gflops", min=0.001, help="Plan with this float32 matmul rate instead of measuring this machine's "
        "(with --eigh-seconds: a plan for another machine).", show_default=False)] = None,
    eigh_seconds: Annotated[Optional[float], typer.Option(
        "--eigh-seconds", min=0.0, help="Seconds of one float64 eigendecomposition of a 4096-wide matrix on the "
        "planned machine.", show_default=False)] = None,
    device_memory: Annotated[Optional[float], typer.Option(
        "--device-memory", min=0.001, help="GB of memory of the planned GPU (default: this machine's GPU, if any).",
        show_default=False)] = None,
    json_output: Annotated[Optional[Path], typer.Option("--json", help="Also write the plan as JSON here.",
                                                        show_default=False)] = None,
) -> None:
    """Print the peak scratch disk, RAM and device memory of each phase of a prune run, and its time."""
    import flows.prune  # noqa: F401 (what a prune process imports is part of its RAM: the plan's baseline)
    from tasks.planning.check import Available, available, check_plan, plan_for
    from tasks.planning.rates import MachineRates

    if (matmul_gflops is None) != (eigh_seconds is None):
        raise SettingError("--matmul-gflops/--eigh-seconds", f"{matmul_gflops}/{eigh_seconds}", "only one given",
                           "give both rates to plan for another machine, or neither to measure this one")
    settings: dict[str, Any] = {
        "model": model,
        "solver": {"method": method, "true_sequential": true_sequential, "targets": targets,
                   "allocation": {"method": allocation, "spread": allocation_spread},
                   "refine": {"method": refine, "epochs": refine_epochs, "batch": refine_batch},
                   **({"pattern": pattern} if pattern is not None else {}),
                   **({"structured": structured} if structured is not None else {})},
        "calibration": {"nsamples": nsamples, "seqlen": seqlen, "activation_dtype": activation_dtype},
        "runtime": {"device": device, "threads": threads, "batch_size": batch_size, "cache_dir": cache_dir,
                    "keep_every": keep_every, "keep_activations": keep_activations,
                    "offload_activations": offload_activations},
        "output": {"folder": output},
    }
    config = validated(PruneConfig, settings, names=FLAGS, fix="see `alps plan --help`")
    given = matmul_gflops is not None
    rates = MachineRates(matmul_gflops, eigh_seconds, "given") if given else None
    target = device.split(":")[0] if device != "auto" else None
    if given and target is None:
        target = "cuda" if device_memory is not None else "cpu"
    with spelled_as(FLAGS | {"device": "--device"}):
        plan = plan_for(model, config, rates=rates, device=target)
    print_plan(plan)
    if json_output is not None:
        atomic_write_text(json_output, json.dumps(plan.to_json(), indent=2, default=str) + "\n")
        console.print(f"Wrote {json_output}")
    if given:  # a plan for another machine: only the device memory it was given can be checked
        machine = Available(scratch_free=float("inf"), output_free=None, host=float("inf"),
                            device=device_memory * GB if device_memory is not None else None)
    else:
        machine = available(config, plan.device)
        if device_memory is not None:
            machine = replace(machine, device=device_memory * GB)
    check_plan(plan, config, machine)
    if given and device_memory is None:
        console.print("Not checked against a machine: give --device-memory to check the planned GPU's.")
    else:
        console.print("[green]It fits[/]" + (" the given device memory." if given else " this machine."))


def print_plan(plan) -> None:
    shape = plan.shape
    table = Table(title=f"Plan: {plan.model} ({shape.model_type}, {shape.layers} blocks, hidden {shape.hidden}) on "
                        f"{plan.device}")
    for column in ("phase", "scratch disk", "host RAM", "device", "time"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for phase in plan.phases:
        device = "-" if plan.device == "cpu" else f"{phase.device / GB:.2f} GB"
        table.add_row(phase.name, f"{phase.disk / GB:.2f} GB", f"{phase.host / GB:.2f} GB", device,
                      _duration(phase.seconds))
    console.print(table)
    for phase in plan.phases:
        console.print(f"  {phase.name}: {phase.detail}")
    console.print(f"Activations on disk at the peak: {plan.activations / GB:.2f} GB ({plan.boundaries_on_disk} "
                  f"boundaries of {plan.boundary / GB:.2f} GB), whatever the depth; pruned block weights: "
                  f"{plan.pruned_weights / GB:.2f} GB by the last block; output folder: {plan.output / GB:.2f} GB.")
    console.print(f"Time: about {_duration(plan.block_seconds)} per block, {_duration(plan.seconds)} for the run.")
    for assumption in plan.assumptions:
        console.print(f"  assumed: {assumption}")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
