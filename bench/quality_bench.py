"""Beyond per-layer ALPS: what each pipeline option buys in perplexity, beside llm-compressor's SparseGPT.

The comparison's protocol (bench/compare_llmcompressor.py): the bundled model, C4 calibration of 32 windows of
512 tokens (seed 0), WikiText-2 and C4 perplexity on 4 windows of 2048 tokens. Each variant is a method with
options, written ``method+option+...``:

    dense        --targets dense: every layer fitted to a mix of its own dense output and the dense model's
                 (--target-mix at its default)
    dense:A      --targets dense --target-mix A (A = 1: the dense model's output alone)
    owl          --allocation owl (OWL's lambda 0.08, M 5)
    refine       --refine adam (block refinement at its defaults)
    refine:E     --refine adam --refine-epochs E
    lr:X         --refine-lr X (beside refine)
    owl:L        --allocation owl --allocation-spread L
    error        --allocation error --allocation-granularity layer (error:L: --allocation-spread L)
                 (the default granularity is layer-in-block: variant inblockerror)
    blockerror   --allocation error --allocation-granularity block (blockerror:L likewise)
    inblockerror --allocation error --allocation-granularity layer-in-block (inblockerror:L likewise)

Each run is a fresh ``alps prune`` process on an empty cache, timed (wall seconds, peak RSS) and evaluated with
``alps ppl``. The reference numbers of llm-compressor's SparseGPT (and of our plain methods from that run) come
from the comparison's results file, which must have been made on the same calibration windows (their sha256 is
checked) and evaluation windows; plain ``alps`` is measured again here, so every option's wall time has a
baseline from the same session. Results go to a JSON file after every run (``--resume`` continues it) and a
markdown table beside it. ``--keep-models`` keeps the pruned folders under ``--work`` for bench/eval_bench.py.

    python bench/quality_bench.py --data-dir ../shared/data --patterns 0.7 \\
        --variants alps alps+dense alps+refine alps+dense+refine alps+owl sparsegpt+owl wanda+owl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    measure_sparsity,
    our_versions,
    prune_ours,
    save_calibration,
)
from bench.compare_llmcompressor import evaluate as evaluate_perplexity  # noqa: E402
from bench.processes import add_calibration_options, isolated_env  # noqa: E402
from tasks.common.files import atomic_write_json, atomic_write_text  # noqa: E402

COMPARISON = REPO / "bench" / "results" / "compare_llmcompressor.json"
OPTIONS = {"dense": ["--targets", "dense"], "owl": ["--allocation", "owl"], "refine": ["--refine", "adam"],
           "error": ["--allocation", "error", "--allocation-granularity", "layer"],
           "blockerror": ["--allocation", "error", "--allocation-granularity", "block"],
           "inblockerror": ["--allocation", "error", "--allocation-granularity", "layer-in-block"], "lr": []}
VALUE_FLAGS = {"dense": "--target-mix", "owl": "--allocation-spread", "refine": "--refine-epochs",
               "error": "--allocation-spread", "blockerror": "--allocation-spread",
               "inblockerror": "--allocation-spread", "lr": "--refine-lr"}  # option:value
# The goals, as ratios of perplexity to llm-compressor SparseGPT's, on both evaluation sets.
GOALS = {"0.7": 0.30, "0.8": 0.15, "2:4": 0.65}
RESULT_SETTINGS = ("model", "calibration", "data_dir", "nsamples", "seqlen", "seed", "ppl_windows", "threads")


def variant_options(variant: str) -> tuple[str, list[str]]:
    """``method+option+...`` -> (method, the ``alps prune`` options)."""
    method, *options = variant.split("+")
    flags: list[str] = []
    for option in options:
        name, _, value = option.partition(":")
        if name not in OPTIONS:
            raise SystemExit(f"variant {variant!r}: unknown option {name!r}; known: {', '.join(OPTIONS)}")
        flags += OPTIONS[name]
        if value:
            flags += [VALUE_FLAGS[name], value]
    return method, flags


def reference_rows(comparison: dict[str, Any], pattern: str) -> dict[str, dict[str, Any]]:
    """The comparison's rows at ``pattern``, by ``tool/method``."""
    return {f"{row['tool']}/{row['method']}": row for row in comparison["runs"] if row["pattern"] == pattern}


def render_markdown(record: dict[str, Any], comparison: dict[str, Any]) -> str:
    settings = record["settings"]
    lines = [f"Model {settings['model']}; calibration {settings['calibration']}, {settings['nsamples']} windows of "
             f"{settings['seqlen']} tokens, seed {settings['seed']} (sha256 {settings['tokens_sha256'][:12]}, the "
             f"comparison's); perplexity on {settings['ppl_windows']} windows of 2048 tokens per data set; "
             f"{settings['threads']} thread(s), {os.cpu_count()} CPUs. Ratios are to llm-compressor SparseGPT's "
             f"perplexity from {COMPARISON.relative_to(REPO)}; wall time is the whole `alps prune` process.", "",
             "| pattern | variant | WikiText-2 ppl | C4 ppl | WikiText-2 ratio | C4 ratio | goal | sparsity | wall (s) "
             "| wall / plain alps |", "|---|---|---|---|---|---|---|---|---|---|"]
    for pattern in settings["patterns"]:
        theirs = reference_rows(comparison, pattern).get("llm-compressor/sparsegpt")
        plain = next((r for r in record["runs"] if r["pattern"] == pattern and r["variant"] == "alps"), None)
        if theirs:
            lines.append(f"| {pattern} | llm-compressor sparsegpt (comparison) | {theirs['wikitext2_ppl']:.2f} | "
                         f"{theirs['c4_ppl']:.2f} | 1.000 | 1.000 | | {theirs['sparsity']:.4f} | "
                         f"{theirs['wall_seconds']:.0f} | |")
        for row in (r for r in record["runs"] if r["pattern"] == pattern):
            ratios = [row.get(f"{name}_ratio") for name in EVAL_SETS]
            goal = GOALS.get(pattern)
            verdict = "" if goal is None or None in ratios else (
                f"{'met' if max(ratios) <= goal else 'missed'} (<= {goal})")
            relative = f"{row['wall_seconds'] / plain['wall_seconds']:.2f}" if plain else ""
            shown = ["-" if r is None else f"{r:.3f}" for r in ratios]
            lines.append(f"| {pattern} | {row['variant']} | {row['wikitext2_ppl']:.2f} | {row['c4_ppl']:.2f} | "
                         f"{shown[0]} | {shown[1]} | {verdict} | {row['sparsity']:.4f} | {row['wall_seconds']:.0f} | "
                         f"{relative} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_calibration_options(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patterns", nargs="+", default=["0.7"])
    parser.add_argument("--variants", nargs="+", default=["alps", "alps+dense", "alps+owl", "alps+dense+owl"])
    parser.add_argument("--ppl-windows", type=int, default=4, help="windows of 2048 tokens per evaluation set")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--solve-workers", type=int, default=1)
    parser.add_argument("--comparison", default=str(COMPARISON), help="the comparison's results JSON")
    parser.add_argument("--work", default=None, help="folder for the models and caches (default: temporary)")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "quality_bench.json"))
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --output, run the rest")
    parser.add_argument("--keep-models", action="store_true", help="keep each pruned folder under --work (for "
                        "bench/eval_bench.py); by default a folder is deleted once it is evaluated")
    args = parser.parse_args()
    if args.data_dir:
        args.data_dir = str(Path(args.data_dir).resolve())
    if args.keep_models and args.work is None:
        raise SystemExit("--keep-models keeps the pruned folders under --work: give --work FOLDER")
    for variant in args.variants:
        variant_options(variant)  # a misspelt variant stops the run before any work

    comparison = json.loads(Path(args.comparison).read_text())
    temporary_work = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="alps-quality-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = isolated_env(work, args.threads)
    dense = materialise_dense(args.model, work)
    sha = save_calibration(dense, args, work / "calibration.safetensors")
    if sha != comparison["settings"]["tokens_sha256"]:
        raise SystemExit(f"the calibration windows (sha256 {sha[:12]}) are not the comparison's "
                         f"({comparison['settings']['tokens_sha256'][:12]}): use its settings")
    settings = {**vars(args), "tokens_sha256": sha, "versions": our_versions()}
    output = Path(args.output).resolve()
    record: dict[str, Any] = {"settings": settings, "runs": []}
    if args.resume and output.is_file():
        previous = json.loads(output.read_text())
        changed = [k for k in RESULT_SETTINGS if previous["settings"].get(k) != settings[k]]
        if changed:
            raise SystemExit(f"--resume: {output} was made with other {changed}; use another --output")
        record["runs"] = previous["runs"]
        for key in ("patterns", "variants"):  # the file covers the earlier invocations' rows as well
            settings[key] = list(dict.fromkeys(previous["settings"][key] + settings[key]))
    done = {(row["pattern"], row["variant"]) for row in record["runs"]}

    def save() -> None:
        atomic_write_json(output, record)
        atomic_write_text(output.with_suffix(".md"), render_markdown(record, comparison))

    for pattern in args.patterns:
        theirs = reference_rows(comparison, pattern).get("llm-compressor/sparsegpt")
        for variant in args.variants:
            if (pattern, variant) in done:
                continue
            method, flags = variant_options(variant)
            name = f"{variant.replace('+', '-').replace(':', '')}-{pattern.replace(':', 'of')}"
            folder = work / name
            seconds, peak, report = prune_ours(method, pattern, dense, folder, args, env, work, sha, extra=flags)
            measured = measure_sparsity(folder, dense)
            started = time.perf_counter()
            perplexity = evaluate_perplexity(folder, name, args, env, work)
            row = {"pattern": pattern, "variant": variant, "method": method, "options": flags,
                   "wall_seconds": seconds, "peak_rss_mb": peak, **measured, **perplexity,
                   "eval_seconds": time.perf_counter() - started, "tool_seconds": report["seconds"],
                   "mean_layer_error": report["mean_rel_error"],
                   "block_sparsity": (report.get("allocation") or {}).get("block_sparsity")}
            for eval_set in EVAL_SETS:
                key = f"{eval_set}_ppl"
                row[f"{eval_set}_ratio"] = row[key] / theirs[key] if theirs else None
            record["runs"].append(row)
            save()
            if not args.keep_models:
                shutil.rmtree(folder, ignore_errors=True)
            print(f"{pattern:>4} {variant:22s} " + "  ".join(
                f"{EVAL_NAMES[s]} {row[f'{s}_ppl']:9.3f} ({row[f'{s}_ratio'] or 0:.3f}x)" for s in EVAL_SETS)
                + f"  sparsity {row['sparsity']:.4f}  wall {seconds:5.0f} s", flush=True)
    save()
    print(render_markdown(record, comparison))
    if temporary_work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
