"""Scale benchmark: random-weight LLaMA models with real shapes pruned end to end, beside the planner's figures.

The block shapes are what count, so each model is built from a real config (TinyLlama-1.1B, Llama-3.1-8B,
Llama-3.1-70B), with as many blocks as asked and the bundled SmolLM2 tokenizer's vocabulary (49,152 instead of
32,000-128,256, to save memory), written as sharded bf16 safetensors. Each run is the real ``alps prune`` in its
own process: wall time, peak RSS (the process's own), peak scratch (the cache folder's activations, polled while
it runs) and, from its report, every block's time split into the layer solves and the rest (loading, X^T X, the
forward, saving). ``--kill-after N`` SIGKILLs the run once N blocks are saved, resumes it with the same command
and, with ``--reference``, compares the output bit for bit with an uninterrupted run. ``alps plan``'s
predictions for the same settings go beside the measurements.

    python bench/scale_bench.py --shape tinyllama --method sparsegpt --reference --kill-after 8
    python bench/scale_bench.py --shape tinyllama --layers 4 --method sparsegpt       # same width, 4 blocks
    python bench/scale_bench.py --shape llama-3.1-8b --layers 1 --method alps
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.processes import ALPS, run_measured  # noqa: E402

# The decoder shapes of the real models (their config.json values that set the block).
SHAPES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, max_position_embeddings=2048, rope_theta=10000.0),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0),
}
VOCAB = 49152  # the bundled SmolLM2 tokenizer's


def build_model(shape: str, layers: int, folder: Path) -> Path:
    """A random-weight LLaMA of ``shape`` with ``layers`` blocks, saved as sharded bf16 with the SmolLM2
    tokenizer (built once per shape and depth)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tasks.common.files import atomic_directory
    from tasks.model.references import locate_model

    config = LlamaConfig(**{**SHAPES[shape], "num_hidden_layers": layers}, vocab_size=VOCAB,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    with atomic_directory(folder) as temporary:
        model.save_pretrained(temporary, max_shard_size="2GB")
        AutoTokenizer.from_pretrained(locate_model("smollm2-135m").location).save_pretrained(temporary)
    return folder


class ScratchWatch:
    """The peak bytes of a folder's files, polled every ``interval`` seconds in a thread."""

    def __init__(self, folder: Path, interval: float = 0.05) -> None:
        self.folder, self.interval, self.peak = folder, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ScratchWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _folder_bytes(self.folder))
            self._stop.wait(self.interval)


def _folder_bytes(folder: Path) -> int:
    total = 0
    for path in folder.glob("*.safetensors*"):  # the temporary files being written count too
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total


def prune_command(model: Path, args: argparse.Namespace, output: Path, cache: Path) -> list[str]:
    return [ALPS, "prune", "--model", str(model), "--method", args.method, "--pattern", args.pattern,
            "--calib", args.calibration, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
            "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--output", str(output),
            "--cache-dir", str(cache), "--overwrite", "--no-eval", "--activation-dtype", args.activation_dtype,
            ] + (["--data-dir", args.data_dir] if args.data_dir else []) + (
            ["--config", args.config] if args.config else [])


def measured_run(command: list[str], env: dict[str, str], cache: Path) -> dict:
    with ScratchWatch(cache / "activations") as watch:
        seconds, peak_mb, log, _ = run_measured(command, env)
    return {"wall_seconds": seconds, "peak_rss_mb": peak_mb, "peak_activations_bytes": watch.peak,
            "log_tail": log[-1500:]}


def killed_run(command: list[str], env: dict[str, str], cache: Path, after: int) -> dict:
    """Start the run, SIGKILL its process group once ``after`` block files exist; returns what it left."""
    blocks = cache / "blocks"
    with ScratchWatch(cache / "activations") as watch:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        while process.poll() is None and len(list(blocks.glob("*.safetensors"))) < after:
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    saved = len(list(blocks.glob("*.safetensors")))
    return {"killed_after_seconds": time.perf_counter() - started, "blocks_saved": saved,
            "peak_activations_bytes": watch.peak}


def output_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def block_phases(report: dict) -> list[dict]:
    """Per block: its seconds, the layer solves' share, and the largest layer solve's time split."""
    rows = []
    for block in report["blocks"]:
        solves = sum(layer["seconds"] for layer in block["layers"])
        rows.append({"block": block["index"], "seconds": block["seconds"], "layer_solves": solves,
                     "other": block["seconds"] - solves, "cached": block["cached"],
                     "peak_rss_mb": block["memory"].get("peak_rss_mb")})
    return rows


def plan_figures(model: Path, args: argparse.Namespace, cache: Path, output: Path) -> dict:
    command = [ALPS, "plan", "--model", str(model), "--method", args.method, "--pattern", args.pattern,
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--threads", str(args.threads),
               "--batch-size", str(args.batch_size), "--activation-dtype", args.activation_dtype, "--device", "cpu",
               "--cache-dir", str(cache), "--output", str(output), "--json", str(output.parent / "plan.json")]
    done = subprocess.run(command, env=_env(args), capture_output=True, text=True)
    if not (output.parent / "plan.json").is_file():
        raise RuntimeError(f"alps plan failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads((output.parent / "plan.json").read_text())


def _env(args: argparse.Namespace) -> dict[str, str]:
    return dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
                OMP_NUM_THREADS=str(args.threads), MLFLOW_DISABLE_TELEMETRY="true")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    parser.add_argument("--layers", type=int, default=None, help="blocks to build (default: the real model's)")
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--pattern", default="0.5")
    parser.add_argument("--config", default=None, help="method settings, as for alps prune --config")
    parser.add_argument("--calibration", default="c4")
    parser.add_argument("--data-dir", default=os.environ.get("ALPS_DATA_DIR"))
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--activation-dtype", default="float32")
    parser.add_argument("--kill-after", type=int, default=None, help="SIGKILL once N blocks are saved, then resume")
    parser.add_argument("--reference", action="store_true", help="also run uninterrupted, and compare the outputs")
    parser.add_argument("--work", default=None, help="folder for models, caches and outputs (default: temporary)")
    parser.add_argument("--output", default=None, help="JSON results file (default: bench/results/scale_*.json)")
    args = parser.parse_args()

    layers = args.layers or SHAPES[args.shape]["num_hidden_layers"]
    work = Path(args.work or tempfile.mkdtemp(prefix="alps-scale-"))
    name = f"{args.shape}-{layers}b-{args.method}-{args.pattern.replace(':', 'of')}"
    output = Path(args.output or REPO / "bench" / "results" / f"scale_{name}.json")
    env = _env(args)
    started = time.perf_counter()
    model = build_model(args.shape, layers, work / "models" / f"{args.shape}-{layers}")
    print(f"model {model} ({layers} blocks) ready in {time.perf_counter() - started:.0f} s", flush=True)
    run_dir = work / name
    record: dict = {"settings": vars(args) | {"layers": layers}, "runs": {}}
    record["plan"] = plan_figures(model, args, run_dir / "plan-cache", run_dir / "plan-out")

    if args.reference:
        cache = run_dir / "reference-cache"
        record["runs"]["reference"] = measured_run(prune_command(model, args, run_dir / "reference", cache), env,
                                                   cache)
        record["runs"]["reference"]["digest"] = output_digest(run_dir / "reference")
        print("reference:", {k: v for k, v in record["runs"]["reference"].items() if k != "log_tail"}, flush=True)
    cache, out = run_dir / "cache", run_dir / "out"
    command = prune_command(model, args, out, cache)
    if args.kill_after is not None:
        record["runs"]["killed"] = killed_run(command, env, cache, args.kill_after)
        print("killed:", record["runs"]["killed"], flush=True)
    record["runs"]["run"] = measured_run(command, env, cache)
    record["runs"]["run"]["digest"] = output_digest(out)
    report = json.loads((out / "prune_report.json").read_text())
    record["blocks"] = block_phases(report)
    record["reused_blocks"], record["computed_blocks"] = report["reused_blocks"], report["computed_blocks"]
    if args.reference:
        record["bit_identical"] = record["runs"]["run"]["digest"] == record["runs"]["reference"]["digest"]
    computed = [row for row in record["blocks"] if not row["cached"]]
    summary = {
        "measured_block_seconds": sum(r["seconds"] for r in computed) / max(len(computed), 1),
        "planned_block_seconds": record["plan"]["block_seconds"],
        "measured_peak_rss_mb": max(r.get("peak_rss_mb") or 0 for r in record["runs"].values()),
        "planned_host_mb": record["plan"]["host_bytes"] / 2**20,
        "measured_peak_activations_bytes": max(r["peak_activations_bytes"] for r in record["runs"].values()),
        "planned_activations_bytes": record["plan"]["activation_bytes"],
        "bit_identical": record.get("bit_identical"),
    }
    record["summary"] = summary
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(json.dumps(summary, indent=2), flush=True)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
