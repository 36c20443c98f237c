"""Options several commands share, defined once: the flag, its type and its help. Each command gives the
default, taken from the settings class it builds (``tasks.config``), so a default is written in one place.

Numbers are taken as the text typed (metavar INTEGER) and parsed by that settings class, so a word where a number
goes and a number out of range both give the one line naming the flag, the value and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from alps_solver import method_names
from tasks.config.defaults import TRACKING_HELP

ModelOption = Annotated[str, typer.Option(
    "--model", "-m", help="Model reference: bundled name (smollm2-135m), local Hugging Face folder, .gguf file, "
    "or hub id org/name[@revision]. See `alps models`.")]
DataDirOption = Annotated[Optional[Path], typer.Option(
    "--data-dir", help="Local data root laid out like shared/data (default: $ALPS_DATA_DIR; if neither is set, "
    "data sets load from the Hugging Face hub).", show_default=False)]
DtypeOption = Annotated[str, typer.Option("--dtype", help="Model dtype: float32, bfloat16 or float16.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N.")]
ThreadsOption = Annotated[Optional[str], typer.Option(
    "--threads", metavar="INTEGER", help="CPU threads for torch (default: torch's choice).", show_default=False)]
TrustRemoteCodeOption = Annotated[bool, typer.Option(
    "--trust-remote-code", help="Allow model code from the hub (off unless asked).")]
ResultsFileOption = Annotated[Optional[Path], typer.Option(
    "--output", "-o", help="Write the results as JSON to this file (atomic write).", show_default=False)]

MethodOption = Annotated[str, typer.Option("--method", help=", ".join(method_names()) + ".")]
MethodConfigOption = Annotated[Optional[list[str]], typer.Option(
    "--config", help="Method setting key=value, repeatable (e.g. max_iter=100, schedule.rho_init=0.3).")]
CalibrationDatasetOption = Annotated[str, typer.Option(
    "--calib", help="Calibration data set: c4, wikitext2, pydoc (needs no data root), ...")]
NsamplesOption = Annotated[str, typer.Option(
    "--nsamples", metavar="INTEGER", help="Calibration windows (at most as many as the calibration text holds "
    "without overlapping).")]
SeqlenOption = Annotated[str, typer.Option("--seqlen", metavar="INTEGER", help="Tokens per calibration window "
                                           "(capped by the model's context).")]
SeedOption = Annotated[str, typer.Option("--seed", metavar="INTEGER", help="Calibration sampling seed.")]
BatchSizeOption = Annotated[str, typer.Option("--batch-size", metavar="INTEGER",
                                              help="Calibration samples per block forward.")]
CacheDirOption = Annotated[Optional[Path], typer.Option(
    "--cache-dir", help="The run's cache folder: task results, block weights and activations (default "
    "$ALPS_CACHE_DIR/runs). A rerun with the same folder resumes.", show_default=False)]
KeepActivationsOption = Annotated[bool, typer.Option(
    "--keep-activations", help="Keep every block boundary's activations, during and after the run (the most "
    "disk; a rerun replays nothing).")]
KeepEveryOption = Annotated[str, typer.Option(
    "--keep-every", metavar="INTEGER", help="Also keep every K-th block boundary's activations while the run goes "
    "on, so a resume replays at most K blocks (0: only the calibration inputs and the current block's inputs and "
    "outputs).")]
ActivationDtypeOption = Annotated[str, typer.Option(
    "--activation-dtype", help="Dtype the block inputs and outputs are stored and kept in: float32, bfloat16 or "
    "float16 (the block math and H stay float32/float64).")]
TargetsOption = Annotated[str, typer.Option(
    "--targets", help="What each pruned layer's output is fitted to: 'layer', the dense layer's output on the "
    "pruned model's inputs; 'dense', the dense model's output, which also corrects the error of the layers "
    "before it (twice the activations on disk).")]
TargetMixOption = Annotated[str, typer.Option(
    "--target-mix", metavar="FLOAT", help="With --targets dense, the dense model's share a of each layer's target: "
    "(1 - a) x the layer's own dense output + a x the dense model's (1: the dense model's alone).")]
AllocationOption = Annotated[str, typer.Option(
    "--allocation", help="How the sparsity is spread over the blocks: uniform, owl (blocks with more outlier "
    "weights keep more) or error (where the dense model's layers lose least); the overall sparsity stays the "
    "target.")]
AllocationSpreadOption = Annotated[str, typer.Option(
    "--allocation-spread", metavar="FLOAT", help="lambda: the allocated sparsities lie within about this much of "
    "the target.")]
RefineOption = Annotated[str, typer.Option(
    "--refine", help="Block refinement after each block's layers are solved: none, or adam (the kept weights tuned "
    "together, masks fixed, toward the dense block's output).")]
RefineEpochsOption = Annotated[str, typer.Option(
    "--refine-epochs", metavar="INTEGER", help="Refinement's passes over the calibration windows.")]
RefineLrOption = Annotated[str, typer.Option("--refine-lr", metavar="FLOAT", help="Refinement's Adam learning rate.")]
RefineBatchOption = Annotated[str, typer.Option(
    "--refine-batch", metavar="INTEGER", help="Calibration windows per refinement step.")]
ResourceCheckOption = Annotated[bool, typer.Option(
    "--resource-check/--no-resource-check", help="Refuse a run whose plan (`alps plan`) does not fit this "
    "machine's free disk, RAM or device memory.")]
OffloadActivationsOption = Annotated[bool, typer.Option(
    "--offload-activations", help="Keep block inputs and outputs in host memory; move one batch at a time to "
    "the device.")]
MaxWindowsOption = Annotated[Optional[str], typer.Option(
    "--max-windows", metavar="INTEGER", help="Score only the first N perplexity windows of each data set.",
    show_default=False)]
TrackingOption = Annotated[str, typer.Option("--tracking", help=f"required or optional. {TRACKING_HELP}.")]
