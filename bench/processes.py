"""What the whole-model benchmarks share: their model and calibration options, and running one configuration
as its own process with its wall time and peak memory."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ALPS = str(Path(sys.executable).with_name("alps"))  # our CLI, from the running environment
PPL_SEQLEN = 2048  # the papers' perplexity window

# Runs the command, then prints the peak RSS of its (only) child: in a fresh process RUSAGE_CHILDREN is exactly
# that child's peak.
_WRAPPER = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(code)")


def run_measured(command: list[str], env: dict[str, str], cwd: Path | None = None,
                 check: bool = True) -> tuple[float, float | None, str, int]:
    """Run ``command``; returns (wall seconds, its peak RSS in MB, its output, exit code). With ``check`` a
    failure raises RuntimeError carrying the end of the output."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _WRAPPER, *command], env=env, cwd=cwd, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - started
    log = done.stdout + done.stderr
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    peak = next((int(line.split()[1]) / 1024 for line in log.splitlines() if line.startswith("MAXRSS_KB")), None)
    return seconds, peak, log, done.returncode


def isolated_env(work: Path, threads: int) -> dict[str, str]:
    """The environment of a benchmark's runs: offline, MLflow and Prefect state inside ``work``, ``threads``
    OpenMP threads."""
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", MLFLOW_DISABLE_TELEMETRY="true",
                PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
                PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_NUM_THREADS=str(threads),
                TOKENIZERS_PARALLELISM="false")


def add_calibration_options(parser: argparse.ArgumentParser) -> None:
    """--model, --calibration, --data-dir, --nsamples and --seqlen, with the benchmarks' defaults."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calibration", default="c4")
    parser.add_argument("--data-dir", default=os.environ.get("ALPS_DATA_DIR"))
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)


def measure_perplexity(model: str | Path, datasets: list[str], output: Path, args: argparse.Namespace,
                       env: dict[str, str], cwd: Path | None = None) -> dict[str, float]:
    """``alps ppl`` on the first ``args.ppl_windows`` windows of PPL_SEQLEN tokens of each data set, the same
    command for every model a benchmark compares; returns {data set: perplexity}, the JSON kept at ``output``."""
    command = [ALPS, "ppl", "--model", str(model), "--datasets", ",".join(datasets), "--seqlen", str(PPL_SEQLEN),
               "--max-windows", str(args.ppl_windows), "--threads", str(args.threads), "--output", str(output)]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    run_measured(command, env, cwd)
    return {r["dataset"]: r["perplexity"] for r in json.loads(output.read_text())["results"]}
