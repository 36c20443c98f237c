"""Structured pruning that shrinks the model: perplexity, size and speed of ALPS-structured and its baselines.

Methods behind ``alps prune --structured``:

    alps       ALPS's group projection chooses the kept neurons/heads, the kept weights are re-solved
    wanda-ls   Wanda's activation-aware channel score ||x_j|| ||W_:j||, the kept weights fitted by least squares
    magnitude  channel magnitude ||W_:j||, no reconstruction

so ALPS's selection is measured apart from its reconstruction. Every structure is ``mlp:F`` and, with ``--heads``,
``mlp:F,heads:H``. The protocol is the other whole-model benchmarks' (bench/quality_bench.py): the bundled model,
C4 calibration of 32 windows of 512 tokens (seed 0), each run a fresh ``alps prune`` process on an empty cache
(wall seconds, peak RSS), then ``alps ppl`` on WikiText-2 and C4 (4 windows of 2048 tokens). Parameters and file
bytes come from the folder's manifest, which the export verified against transformers' own model of the new
config.

Speed (``--speed``): for each structure, the dense model and the smaller one (any method's: speed depends on the
shapes alone) are loaded with vanilla ``AutoModelForCausalLM.from_pretrained`` in float32, in one process at
``--speed-threads``, and timed alternately, dense then pruned, ``--repeats`` times after a warm-up: greedy
generation of 128 new tokens from a 32-token prompt (``min_new_tokens`` 128, so it never stops early), and a
prefill of 2048 tokens (one forward with the cache, logits of the last position only, as ``generate`` does).
Medians are reported. Speed wants a quiet machine: say what else ran.

Goals (issue): parameters and bytes shrink by the removed fraction; at ``mlp:0.3`` ALPS's perplexity is at most
0.7x the better baseline's on both sets; decode at least 1.2x faster than dense at ``mlp:0.3,heads:0.25``.

    python bench/structured_bench.py --data-dir ../shared/data --mlp 0.1 0.2 0.3 0.5 --heads 0.25 \\
        --methods alps wanda-ls magnitude --speed --resume
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.compare_llmcompressor import (  # noqa: E402
    EVAL_NAMES,
    EVAL_SETS,
    materialise_dense,
    our_versions,
    prune_ours,
    save_calibration,
)
from bench.compare_llmcompressor import evaluate as evaluate_perplexity  # noqa: E402
from bench.processes import add_calibration_options, isolated_env  # noqa: E402
from tasks.common.files import SPARSITY_MANIFEST_FILE, atomic_write_json, atomic_write_text  # noqa: E402
from tasks.model.checkpoint import Checkpoint  # noqa: E402

BASELINES = ("wanda-ls", "magnitude")
GOAL_STRUCTURE, GOAL_RATIO = "mlp:0.3", 0.7  # ALPS / the better baseline, both sets
SPEED_STRUCTURE, SPEED_GOAL = "mlp:0.3,heads:0.25", 1.2  # dense decode time / pruned
PROMPT_TOKENS, NEW_TOKENS, PREFILL_TOKENS = 32, 128, 2048
RESULT_SETTINGS = ("model", "calibration", "data_dir", "nsamples", "seqlen", "seed", "ppl_windows", "threads")


def structures(mlp: list[float], heads: list[float]) -> list[str]:
    """Every ``mlp:F`` and ``mlp:F,heads:H``, in the order given (a run stopped early has the first ones)."""
    texts = []
    for fraction in mlp:
        texts.append(f"mlp:{fraction:g}")
        texts += [f"mlp:{fraction:g},heads:{h:g}" for h in heads]
    return texts


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def time_models(dense: Path, pruned: Path, repeats: int, seed: int) -> dict[str, Any]:
    """The speed worker (its own process): median decode and prefill seconds of both models, measured alternately."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    models = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
              for name, path in (("dense", dense), ("pruned", pruned))}
    vocab = models["dense"].config.vocab_size
    prompt = torch.randint(0, vocab, (1, PROMPT_TOKENS))
    long = torch.randint(0, vocab, (1, PREFILL_TOKENS))

    def decode(model: Any) -> float:
        started = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        seconds = time.perf_counter() - started
        if out.shape[1] != PROMPT_TOKENS + NEW_TOKENS:
            raise RuntimeError(f"generated {out.shape[1] - PROMPT_TOKENS} tokens, not {NEW_TOKENS}")
        return seconds

    def prefill(model: Any) -> float:
        started = time.perf_counter()
        model(long, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - started

    times: dict[str, dict[str, list[float]]] = {name: {"decode": [], "prefill": []} for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up: allocator, kernels' first-call costs
            decode(model)
            prefill(model)
        for _ in range(repeats):
            for name, model in models.items():
                times[name]["decode"].append(decode(model))
                times[name]["prefill"].append(prefill(model))
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "repeats": repeats}
    for name, kinds in times.items():
        for kind, seconds in kinds.items():
            result[f"{name}_{kind}_s"] = statistics.median(seconds)
            result[f"{name}_{kind}_all_s"] = seconds
    for kind in ("decode", "prefill"):
        result[f"{kind}_speedup"] = result[f"dense_{kind}_s"] / result[f"pruned_{kind}_s"]
    result["pruned_decode_tokens_per_s"] = NEW_TOKENS / result["pruned_decode_s"]
    result["dense_decode_tokens_per_s"] = NEW_TOKENS / result["dense_decode_s"]
    return result


def measure_speed(dense: Path, pruned: Path, args: argparse.Namespace, env: dict[str, str],
                  output: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--speed-worker", str(dense), str(pruned), str(output),
               "--repeats", str(args.repeats), "--seed", str(args.seed)]
    done = subprocess.run(command, env=dict(env, OMP_NUM_THREADS=str(args.speed_threads)), capture_output=True,
                          text=True)
    if done.returncode:
        raise RuntimeError(f"speed worker failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(output.read_text())


def render_markdown(record: dict[str, Any]) -> str:
    settings = record["settings"]
    dense = record.get("dense") or {}
    lines = [f"Model {settings['model']}; calibration {settings['calibration']}, {settings['nsamples']} windows of "
             f"{settings['seqlen']} tokens, seed {settings['seed']}; perplexity on {settings['ppl_windows']} windows "
             f"of 2048 tokens per data set; prunes at {settings['threads']} thread(s), {os.cpu_count()} CPUs. "
             "`vs best baseline`: ALPS's perplexity over the better of wanda-ls and magnitude on that set; "
             "parameters and bytes as fractions of the dense model's.", "",
             "| structure | method | kept neurons | kept heads | WikiText-2 ppl | C4 ppl | vs best baseline "
             "(WikiText-2 / C4) | parameters | bytes | wall (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    if dense:
        lines.append(f"| dense | - | {dense['neurons']} | {dense['heads']} | {dense['wikitext2_ppl']:.2f} | "
                     f"{dense['c4_ppl']:.2f} | | {dense['parameters'] / 1e6:.1f}M | {dense['bytes'] / 1e6:.0f} MB | |")
    for structure in settings["structures"]:
        rows = [r for r in record["runs"] if r["structure"] == structure]
        best = {s: min((r[f"{s}_ppl"] for r in rows if r["method"] in BASELINES), default=None) for s in EVAL_SETS}
        for row in rows:
            versus = ""
            if row["method"] == "alps" and None not in best.values():
                ratios = [row[f"{s}_ppl"] / best[s] for s in EVAL_SETS]
                versus = " / ".join(f"{r:.3f}" for r in ratios)
                if structure == GOAL_STRUCTURE:
                    versus += f" ({'met' if max(ratios) <= GOAL_RATIO else 'missed'}, <= {GOAL_RATIO})"
            share = (f"{row['parameters'] / dense['parameters']:.3f} | {row['bytes'] / dense['bytes']:.3f}"
                     if dense else f"{row['parameters'] / 1e6:.1f}M | {row['bytes'] / 1e6:.0f} MB")
            lines.append(f"| {structure} | {row['method']} | {row['neurons']} | {row['heads']} | "
                         f"{row['wikitext2_ppl']:.2f} | {row['c4_ppl']:.2f} | {versus} | {share} | "
                         f"{row['wall_seconds']:.0f} |")
    if record.get("speed"):
        lines += ["", f"Speed: transformers, float32, medians of {record['speed'][0]['repeats']} alternating runs at "
                  f"{record['speed'][0]['threads']} thread(s); decode = {NEW_TOKENS} new tokens from a "
                  f"{PROMPT_TOKENS}-token prompt, prefill = {PREFILL_TOKENS} tokens.", "",
                  "| structure | parameters | decode dense (s) | decode pruned (s) | decode speedup "
                  "| prefill dense (s) | prefill pruned (s) | prefill speedup |", "|---|---|---|---|---|---|---|---|"]
        for row in record["speed"]:
            goal = (f" ({'met' if row['decode_speedup'] >= SPEED_GOAL else 'missed'}, >= {SPEED_GOAL})"
                    if row["structure"] == SPEED_STRUCTURE else "")
            share = f"{row['parameters'] / dense['parameters']:.3f}" if dense else f"{row['parameters'] / 1e6:.1f}M"
            lines.append(f"| {row['structure']} | {share} | {row['dense_decode_s']:.3f} | {row['pruned_decode_s']:.3f} "
                         f"| {row['decode_speedup']:.2f}x{goal} | {row['dense_prefill_s']:.3f} | "
                         f"{row['pruned_prefill_s']:.3f} | {row['prefill_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def dense_row(dense: Path, args: argparse.Namespace, env: dict[str, str], work: Path) -> dict[str, Any]:
    config = json.loads((dense / "config.json").read_text())
    return {"neurons": config["intermediate_size"], "heads": config["num_attention_heads"],
            "parameters": Checkpoint(dense).parameters(), "bytes": folder_size(dense),
            **evaluate_perplexity(dense, "dense", args, env, work)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--speed-worker":
        worker = argparse.ArgumentParser()
        worker.add_argument("--speed-worker", nargs=3, metavar=("DENSE", "PRUNED", "OUTPUT"))
        worker.add_argument("--repeats", type=int, default=3)
        worker.add_argument("--seed", type=int, default=0)
        known = worker.parse_args()
        dense, pruned, output = known.speed_worker
        atomic_write_json(Path(output), time_models(Path(dense), Path(pruned), known.repeats, known.seed))
        return

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_calibration_options(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mlp", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5],
                        help="fractions of MLP neurons removed")
    parser.add_argument("--heads", nargs="*", type=float, default=[0.25],
                        help="fractions of attention heads removed beside each MLP fraction (none: MLP only)")
    parser.add_argument("--methods", nargs="+", default=["alps", *BASELINES])
    parser.add_argument("--ppl-windows", type=int, default=4, help="windows of 2048 tokens per evaluation set")
    parser.add_argument("--threads", type=int, default=1, help="threads of each prune and evaluation")
    parser.add_argument("--solve-workers", type=int, default=1)
    parser.add_argument("--speed", action="store_true", help="also time decode and prefill of each structure")
    parser.add_argument("--speed-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each model per structure")
    parser.add_argument("--work", default=None, help="folder for the models and caches (default: temporary)")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "structured_bench.json"))
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --output, run the rest")
    args = parser.parse_args()
    if args.data_dir:
        args.data_dir = str(Path(args.data_dir).resolve())
    unknown = set(args.methods) - {"alps", *BASELINES}
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; known: alps, {', '.join(BASELINES)}")

    temporary_work = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="alps-structured-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = isolated_env(work, args.threads)
    dense = materialise_dense(args.model, work)
    sha = save_calibration(dense, args, work / "calibration.safetensors")
    settings = {**vars(args), "tokens_sha256": sha, "versions": our_versions(),
                "structures": structures(args.mlp, args.heads)}
    output = Path(args.output).resolve()
    record: dict[str, Any] = {"settings": settings, "dense": None, "runs": [], "speed": []}
    if args.resume and output.is_file():
        previous = json.loads(output.read_text())
        changed = [k for k in RESULT_SETTINGS if previous["settings"].get(k) != settings[k]]
        if changed:
            raise SystemExit(f"--resume: {output} was made with other {changed}; use another --output")
        record.update(dense=previous["dense"], runs=previous["runs"], speed=previous["speed"])
        settings["structures"] = list(dict.fromkeys(previous["settings"]["structures"] + settings["structures"]))
    done = {(row["structure"], row["method"]) for row in record["runs"]}
    timed = {row["structure"] for row in record["speed"]}

    def save() -> None:
        atomic_write_json(output, record)
        atomic_write_text(output.with_suffix(".md"), render_markdown(record))

    if record["dense"] is None:
        record["dense"] = dense_row(dense, args, env, work)
        save()
    for structure in structures(args.mlp, args.heads):
        for method in args.methods:
            folder = work / f"{method}-{structure.replace(':', '').replace(',', '-')}"
            if (structure, method) not in done:
                seconds, peak, report = prune_ours(method, None, dense, folder, args, env, work, sha,
                                                   extra=["--structured", structure])
                manifest = json.loads((folder / SPARSITY_MANIFEST_FILE).read_text())
                config = json.loads((folder / "config.json").read_text())
                started = time.perf_counter()
                perplexity = evaluate_perplexity(folder, folder.name, args, env, work)
                row = {"structure": structure, "method": method, "wall_seconds": seconds, "peak_rss_mb": peak,
                       "tool_seconds": report["seconds"], "mean_layer_error": report["mean_rel_error"],
                       "neurons": config["intermediate_size"], "heads": config["num_attention_heads"],
                       "kv_heads": config.get("num_key_value_heads"),
                       "parameters": manifest["parameters"]["after"], "bytes": folder_size(folder),
                       "removed_fraction": manifest["removed_fraction"], **perplexity,
                       "eval_seconds": time.perf_counter() - started}
                record["runs"].append(row)
                save()
                print(f"{structure:20s} {method:10s} " + "  ".join(
                    f"{EVAL_NAMES[s]} {row[f'{s}_ppl']:9.3f}" for s in EVAL_SETS)
                    + f"  parameters {row['parameters'] / 1e6:.1f}M  wall {seconds:5.0f} s", flush=True)
                if args.speed and structure not in timed:  # the first folder of this shape, any method's
                    speed = measure_speed(dense, folder, args, env, work / f"speed-{folder.name}.json")
                    record["speed"].append({"structure": structure, "timed_folder_of": method,
                                            "parameters": row["parameters"], **speed})
                    timed.add(structure)
                    save()
                    print(f"{structure:20s} decode {speed['decode_speedup']:.2f}x  prefill "
                          f"{speed['prefill_speedup']:.2f}x", flush=True)
                shutil.rmtree(folder, ignore_errors=True)
    save()
    print(render_markdown(record))
    if temporary_work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
