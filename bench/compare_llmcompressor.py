"""Side by side with llm-compressor: the same model, calibration windows and evaluation windows.

On the bundled model (materialised once as a plain Hugging Face folder in the work folder, the one folder
both tools load), for each pattern this runs llm-compressor's SparseGPT and Wanda and our ALPS,
alps-simple, SparseGPT and Wanda, interleaving the tools (the order reverses on every other pattern) so
that machine drift affects both. Each prune is its own process: wall time and peak RSS are those of what
a user waits for; the tool's own pruning time is also recorded (theirs: the ``oneshot`` call; ours: the
block solves of prune_report.json). Every model, dense included, is then evaluated the same way with
``alps ppl`` (WikiText-2 and C4, windows of 2048 tokens), and its achieved sparsity is read from the saved
weights, checking that nothing but the decoder linears changed.

Calibration windows are drawn once here with ``tasks.data.sampling.calibration_windows`` and saved to
``WORK/calibration.safetensors`` for llm-compressor (``bench/llmcompressor_worker.py``, run with the
python of llm-compressor's own virtual environment, created and installed when missing). Our runs draw
them with the same function; their prune_report.json records the sha256 of the windows used, and a
differing hash stops the benchmark. Each of our runs gets a fresh cache folder, so no run reuses another's
calibration capture.

``--layer-check`` also runs both SparseGPTs on the same real layer problems (W, H of blocks 0 and 15, captured on
the same calibration windows; theirs through llm-compressor's own ``sparsify_weight``, in
``bench/llmcompressor_layers.py``) and reports our error over theirs per pattern: the algorithm compared
without the pipelines around it.

``--batch-check`` runs our SparseGPT again at the target pattern with other calibration batch sizes: H is
summed per batch of windows and the block forward passes run per batch, while llm-compressor feeds one
window at a time. The batch size changes nothing but float rounding, yet at high sparsity that alone moves a
small model's perplexity by several percent. Batch size 1 is the like-for-like correctness check of our
SparseGPT against theirs.

Results go to a JSON file after every run (``--resume`` continues one with the same settings), a markdown
table and a plot beside it.

    python bench/compare_llmcompressor.py --data-dir ../shared/data --llmc-venv /work/llmc/venv
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORKER = REPO / "bench" / "llmcompressor_worker.py"
LAYER_WORKER = REPO / "bench" / "llmcompressor_layers.py"

from bench.processes import (  # noqa: E402
    ALPS,
    PPL_SEQLEN,
    add_calibration_options,
    isolated_env,
    measure_perplexity,
    run_measured,
)
from tasks.common.files import atomic_write_json, atomic_write_text  # noqa: E402
from tasks.config.prune import RuntimeConfig  # noqa: E402

OURS, THEIRS = "ours", "llm-compressor"
# One pattern's runs, tools interleaved; every other pattern runs them in reverse.
PAIRS = ((THEIRS, "sparsegpt"), (OURS, "sparsegpt"), (OURS, "alps"),
         (THEIRS, "wanda"), (OURS, "wanda"), (OURS, "alps-simple"))
EVAL_SETS = ("wikitext2", "c4")
EVAL_NAMES = {"wikitext2": "WikiText-2", "c4": "C4"}
LLMC_PINS = ("torch==2.13.0", "llmcompressor==0.14.0.1")
# Decoder-layer linear weights (LLaMA names): the tensors pruning may change; all others must stay bit-identical.
DECODER_LINEAR = re.compile(r"\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight$")
# Settings that decide the numbers: a resumed file must have been made with the same ones.
RESULT_SETTINGS = ("model", "calibration", "data_dir", "nsamples", "seqlen", "seed", "ppl_windows", "ppl_seqlen",
                   "threads", "tokens_sha256", "versions")
TARGET_PATTERN = "0.7"
# --layer-check: real layer problems of these blocks and layers, SparseGPT by both tools on the same (W, H).
LAYER_CHECK_BLOCKS = [0, 15]
LAYER_CHECK_LAYERS = ["q_proj", "o_proj", "up_proj", "down_proj"]
# --batch-check: our SparseGPT again at TARGET_PATTERN with these calibration batch sizes (windows per block
# forward; H is summed per batch). llm-compressor feeds one window per forward, like batch size 1.
BATCH_CHECK_SIZES = (1, 4)
ALPS_PPL_RATIO = 0.87  # our ALPS perplexity at most this times llm-compressor SparseGPT's
SPARSEGPT_PPL_TOLERANCE = 0.02  # our SparseGPT perplexity within 2% of theirs
ALPS_WALL_RATIO = 1.5  # our ALPS wall time at most this times their SparseGPT's
ALPS_SIMPLE_WALL_RATIO = 1.0
KNOWN_ISSUES = (
    # (key, method, variant, what a user would expect, the cause as read in llm-compressor 0.14.0.1's source)
    ("magnitude_oneshot", "magnitude", "none",
     "MagnitudePruningModifier (init/final sparsity 0.5, start 0, end 1) under oneshot leaves the decoder "
     "linears 50% sparse",
     "oneshot runs it in the data-free pipeline; the modifier computes masks but multiplies them into the "
     "weights only on optimizer-step events (training), which oneshot never sends"),
    ("owl_profile", "wanda", "owl",
     'sparsity_profile="owl" (owl_m=5, owl_lmbda=0.08) prunes to 0.5 on average with per-layer sparsities',
     "on_initialize measures activations with run_calibration, which sends a calibration event to the "
     "session before the session has finished initializing"),
    ("ignore_exact_lm_head", "wanda", "ignore-exact-lm-head",
     'ignore=["lm_head"] keeps lm_head (tied to the input embedding here) unpruned',
     'the modifier names a target\'s linears "<target>.<child>", "lm_head." for lm_head itself, so only a '
     'regex such as "re:.*lm_head" matches it'),
)


# ------------------------------------------------------------------------------------------ pure logic
def run_order(patterns: Iterable[str]) -> list[tuple[str, str, str]]:
    """``(pattern, tool, method)`` in the order they run: tools interleaved, reversed every other pattern."""
    order = []
    for index, pattern in enumerate(patterns):
        pairs = PAIRS if index % 2 == 0 else tuple(reversed(PAIRS))
        order += [(pattern, tool, method) for tool, method in pairs]
    return order


def is_decoder_linear(name: str) -> bool:
    return DECODER_LINEAR.search(name) is not None


def measure_sparsity(folder: Path, dense: Path) -> dict[str, Any]:
    """Zero fraction over all decoder-layer linear weights of ``folder``, and whether every other tensor is
    bit-identical to ``dense`` (same names, dtypes, shapes, values)."""
    from tasks.model.checkpoint import Checkpoint

    pruned, original = Checkpoint(Path(folder)), Checkpoint(Path(dense))
    zeros = total = 0
    changed = [f"only in the pruned model: {n}" for n in sorted(set(pruned.names) - set(original.names))]
    changed += [f"missing from the pruned model: {n}" for n in sorted(set(original.names) - set(pruned.names))]
    for name, tensor in pruned.iter_tensors():
        if is_decoder_linear(name):
            zeros += int((tensor == 0).sum())
            total += tensor.numel()
        elif name in original.weight_map:
            reference = original.tensors([name])[name]
            if tensor.dtype != reference.dtype or tensor.shape != reference.shape or not _bit_equal(tensor, reference):
                changed.append(f"changed: {name}")
    if not total:
        raise ValueError(f"{folder}: no decoder-layer linear weights (names like {DECODER_LINEAR.pattern})")
    return {"sparsity": zeros / total, "untouched_other_tensors": not changed, "changed_tensors": changed}


def _bit_equal(a, b) -> bool:
    import torch

    # Bytes, not values: torch.equal calls -0.0 equal to 0.0 and a NaN unequal to itself.
    return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def _find(runs: list[dict[str, Any]], tool: str, method: str, pattern: str) -> dict[str, Any] | None:
    return next((r for r in runs if (r["tool"], r["method"], r["pattern"]) == (tool, method, pattern)), None)


def compute_targets(runs: list[dict[str, Any]], pattern: str = TARGET_PATTERN,
                    batch_check: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The comparison's targets at ``pattern``: one row each with the measured ratio, the allowed bound and
    ``passed`` (None when a run it needs is missing). With ``batch_check`` (from ``--batch-check``), the
    SparseGPT correctness target is also checked for our run with one window per batch, as llm-compressor
    accumulates H."""
    theirs = _find(runs, THEIRS, "sparsegpt", pattern)
    targets = []

    def add(name: str, row: dict[str, Any] | None, key: str, low: float | None, high: float) -> None:
        ratio = None
        if row is not None and theirs is not None and row.get(key) and theirs.get(key):
            ratio = row[key] / theirs[key]
        passed = None if ratio is None else (low is None or ratio >= low) and ratio <= high
        bound = f"<= {high:g}x" if low is None else f"within {high - 1:.0%}"
        targets.append({"target": name, "pattern": pattern, "measure": key, "ratio": ratio, "bound": bound,
                        "passed": passed})

    for eval_set in EVAL_SETS:
        key = f"{eval_set}_ppl"
        label = EVAL_NAMES[eval_set]
        add(f"ALPS {label} ppl vs their SparseGPT", _find(runs, OURS, "alps", pattern), key, None, ALPS_PPL_RATIO)
        add(f"our SparseGPT {label} ppl vs theirs", _find(runs, OURS, "sparsegpt", pattern), key,
            1 - SPARSEGPT_PPL_TOLERANCE, 1 + SPARSEGPT_PPL_TOLERANCE)
    matched = next((r for r in (batch_check or {}).get("runs", []) if r["batch_size"] == 1), None)
    if matched is not None and batch_check["pattern"] == pattern:
        for eval_set in EVAL_SETS:
            add(f"our SparseGPT, one window per batch as theirs, {EVAL_NAMES[eval_set]} ppl vs theirs", matched,
                f"{eval_set}_ppl", 1 - SPARSEGPT_PPL_TOLERANCE, 1 + SPARSEGPT_PPL_TOLERANCE)
    add("ALPS wall time vs their SparseGPT", _find(runs, OURS, "alps", pattern), "wall_seconds", None,
        ALPS_WALL_RATIO)
    add("alps-simple wall time vs their SparseGPT", _find(runs, OURS, "alps-simple", pattern), "wall_seconds", None,
        ALPS_SIMPLE_WALL_RATIO)
    return targets


def summarise_layer_check(ours: dict[str, float], theirs: dict[str, float]) -> dict[str, Any]:
    """Per pattern, our SparseGPT's error over llm-compressor's on the same layer problems (keys ``PATTERN|NAME``)."""
    if set(ours) != set(theirs):
        raise ValueError(f"layer check: different problems ({sorted(set(ours) ^ set(theirs))[:4]})")
    patterns: dict[str, list[float]] = {}
    for key in ours:
        patterns.setdefault(key.split("|", 1)[0], []).append(ours[key] / theirs[key])
    return {pattern: {"layers": len(ratios), "mean_ratio": sum(ratios) / len(ratios),
                      "min_ratio": min(ratios), "max_ratio": max(ratios)} for pattern, ratios in patterns.items()}


def _verdict(passed: bool | None) -> str:
    return "n/a" if passed is None else ("PASS" if passed else "MISS")


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_markdown(record: dict[str, Any]) -> str:
    """The results as markdown: settings, dense perplexity, one table row per run, targets, known issues."""
    settings = record["settings"]
    versions = settings.get("versions", {})
    patterns = settings.get("patterns") or []
    dense = record.get("dense") or {}
    lines = [
        f"Model {settings['model']}; calibration {settings['calibration']}, {settings['nsamples']} windows of "
        f"{settings['seqlen']} tokens, seed {settings['seed']} (sha256 {str(settings.get('tokens_sha256'))[:12]}), "
        f"the same windows for both tools; perplexity on {settings['ppl_windows']} windows of "
        f"{settings['ppl_seqlen']} tokens per data set; {settings['threads']} thread(s), "
        f"{settings.get('machine', {}).get('cpu_count', '?')} CPUs.",
        f"Versions: ours {versions.get('ours', {})}; llm-compressor {versions.get('llm-compressor', {})}.",
        "",
        f"Dense perplexity: WikiText-2 {_number(dense.get('wikitext2_ppl'))}, C4 {_number(dense.get('c4_ppl'))}"
        + (f" (its decoder linears are already {dense['sparsity']:.2%} zeros)." if dense.get("sparsity") else "."),
        "",
        "| pattern | tool | method | WikiText-2 ppl | C4 ppl | sparsity | other tensors untouched | "
        "wall (s) | tool time (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    method_rank = {method: i for i, method in enumerate(("sparsegpt", "wanda", "alps", "alps-simple"))}

    def order(row: dict[str, Any]) -> tuple:
        pattern = patterns.index(row["pattern"]) if row["pattern"] in patterns else len(patterns)
        return pattern, method_rank.get(row["method"], 99), row["tool"] != THEIRS

    for row in sorted(record.get("runs", []), key=order):
        lines.append(
            f"| {row['pattern']} | {row['tool']} | {row['method']} | {_number(row.get('wikitext2_ppl'))} | "
            f"{_number(row.get('c4_ppl'))} | {_number(row.get('sparsity'), 4)} | "
            f"{'yes' if row.get('untouched_other_tensors') else 'NO'} | {_number(row.get('wall_seconds'), 0)} | "
            f"{_number(row.get('tool_seconds'), 0)} | {_number(row.get('peak_rss_mb'), 0)} |")
    targets = record.get("targets") or []
    if targets:
        lines += ["", f"Targets at {targets[0]['pattern']} (measured as a ratio to llm-compressor's SparseGPT):", "",
                  "| target | ratio | bound | result |", "|---|---|---|---|"]
        lines += [f"| {t['target']} | {_number(t['ratio'], 3)} | {t['bound']} | {_verdict(t['passed'])} |"
                  for t in targets]
    check = record.get("sparsegpt_layer_check")
    if check:
        lines += ["", f"SparseGPT on identical layer problems ({check['layers']} real layers of blocks "
                  f"{check['blocks']}, the same W and H for both; llm-compressor's own sparsify_weight): "
                  "our error / llm-compressor's error:", "",
                  "| pattern | layers | mean | min | max |", "|---|---|---|---|---|"]
        lines += [f"| {pattern} | {row['layers']} | {row['mean_ratio']:.4f} | {row['min_ratio']:.4f} | "
                  f"{row['max_ratio']:.4f} |" for pattern, row in check["summary"].items()]
    batches = record.get("sparsegpt_batch_check")
    if batches:
        theirs = _find(record.get("runs", []), THEIRS, "sparsegpt", batches["pattern"]) or {}
        main = _find(record.get("runs", []), OURS, "sparsegpt", batches["pattern"])
        rows = [*batches["runs"], *([{**main, "batch_size": f"{batches['default_batch_size']} (main run)"}]
                                    if main else [])]
        lines += ["", f"Our SparseGPT at {batches['pattern']} by calibration batch size (windows per block forward; "
                  "H is summed per batch, llm-compressor feeds one window at a time):", "",
                  "| batch size | WikiText-2 ppl | C4 ppl | / theirs WikiText-2 | / theirs C4 |",
                  "|---|---|---|---|---|"]
        for row in rows:
            ratios = [row[f"{e}_ppl"] / theirs[f"{e}_ppl"] if theirs.get(f"{e}_ppl") else None for e in EVAL_SETS]
            lines.append(f"| {row['batch_size']} | {_number(row['wikitext2_ppl'])} | {_number(row['c4_ppl'])} | "
                         f"{_number(ratios[0], 3)} | {_number(ratios[1], 3)} |")
    issues = record.get("known_issues") or {}
    if issues:
        lines += ["", "Known llm-compressor issues (checked with --check-known-issues at 0.5):", ""]
        lines += [f"- {key}: expected: {issue['expected']}; observed: {issue['observed']}"
                  + (f"; cause: {issue['cause']}" if issue.get("cause") else "")
                  for key, issue in issues.items()]
    lines += ["", "Wall time and peak RSS are those of the whole process (a user's run: start-up, loading, "
              "calibration, pruning, saving; ours also starts a local Prefect server and logs to MLflow). "
              "Tool time: their oneshot call; our block solves (prune_report.json `seconds`)."]
    workers = sorted({row.get("solve_workers", 1) for row in record.get("runs", []) if row["tool"] == OURS})
    if workers != [1] and workers:
        lines += ["", f"Our runs solved a block's layers {' or '.join(map(str, workers))} at a time "
                  "(`alps prune --solve-workers`, the threads shared among them)."]
    return "\n".join(lines) + "\n"


def plot_results(record: dict[str, Any], path: Path) -> Path:
    """Perplexity against sparsity for both tools, one panel per evaluation set, log y; 2:4 as separate markers
    at 0.5; the dense model as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    runs = record.get("runs", [])
    dense = record.get("dense") or {}
    colors = {"sparsegpt": "tab:blue", "wanda": "tab:orange", "alps": "tab:green", "alps-simple": "tab:olive"}
    figure, axes = plt.subplots(1, len(EVAL_SETS), figsize=(12, 4.8), squeeze=False)
    for axis, eval_set in zip(axes[0], EVAL_SETS):
        key = f"{eval_set}_ppl"
        for tool, method in sorted(set(PAIRS)):
            style = {"color": colors.get(method, "gray"), "linestyle": "-" if tool == OURS else "--",
                     "marker": "o" if tool == OURS else "s", "fillstyle": "full" if tool == OURS else "none"}
            points = sorted((float(r["pattern"]), r[key]) for r in runs
                            if (r["tool"], r["method"]) == (tool, method) and ":" not in r["pattern"] and r.get(key))
            if points:
                axis.plot(*zip(*points), label=f"{tool} {method}", **style)
            structured = [(1 - int(r["pattern"].split(":")[0]) / int(r["pattern"].split(":")[1]), r[key])
                          for r in runs if (r["tool"], r["method"]) == (tool, method) and ":" in r["pattern"]
                          and r.get(key)]
            if structured:
                axis.plot(*zip(*structured), linestyle="none", marker="*" if tool == OURS else "X",
                          markersize=11, color=style["color"], fillstyle="full")
        if dense.get(key):
            axis.axhline(dense[key], color="black", linestyle=":", linewidth=1)
        axis.set_yscale("log")
        axis.set_xlabel("sparsity of the decoder linears")
        axis.set_ylabel(f"{EVAL_NAMES[eval_set]} perplexity")
        axis.set_title(EVAL_NAMES[eval_set])
        axis.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    handles += [Line2D([], [], color="gray", marker="*", linestyle="none", markersize=11),
                Line2D([], [], color="gray", marker="X", linestyle="none", markersize=9),
                Line2D([], [], color="black", linestyle=":")]
    labels += ["ours 2:4 (at 0.5)", "llm-compressor 2:4 (at 0.5)", "dense"]
    figure.legend(handles, labels, loc="center right", fontsize=8)
    figure.suptitle(f"{record['settings']['model']}: ours vs llm-compressor (same calibration and evaluation windows)")
    figure.tight_layout(rect=(0, 0, 0.8, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)
    return path


# ------------------------------------------------------------------------------------------ processes
def worker_result(log: str) -> dict[str, Any]:
    """The worker's final ``RESULT {json}`` line."""
    lines = [line for line in log.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"the llm-compressor worker printed no RESULT line:\n{log[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def ensure_llmc_venv(venv: Path) -> Path:
    """The python of llm-compressor's virtual environment; creates and installs it when it has none."""
    python = venv / "bin" / "python"
    if python.is_file():
        return python
    print(f"no {python}: creating a virtual environment at {venv} and installing {' '.join(LLMC_PINS)} "
          "(several minutes, a few GB)", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", *LLMC_PINS], check=True)
    except (subprocess.CalledProcessError, KeyboardInterrupt):
        shutil.rmtree(venv, ignore_errors=True)  # a half-made venv would pass the check above next time
        raise
    return python


def llmc_versions(python: Path, env: dict[str, str], cwd: Path) -> dict[str, str]:
    _, _, log, _ = run_measured([str(python), str(WORKER), "--model", "-", "--tokens", "-", "--method", "wanda",
                        "--pattern", "0.5", "--output", "-", "--versions"], env, cwd)
    return worker_result(log)["versions"]


def our_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in ("alps-prune", "torch", "transformers")}


def materialise_dense(reference: str, work: Path) -> Path:
    """A plain Hugging Face folder of the model in the work folder (copied from the converted/cached one)."""
    from tasks.common.files import atomic_directory
    from tasks.model.references import locate_model

    source = Path(locate_model(reference).location)
    if not source.is_dir():
        raise SystemExit(f"--model {reference}: not a local model (hub models: download the folder first)")
    destination = work / "dense"
    if not (destination / "config.json").is_file():
        with atomic_directory(destination) as temporary:
            for item in source.iterdir():
                if item.is_file():
                    shutil.copyfile(item, temporary / item.name)
    return destination


def save_calibration(dense: Path, args: argparse.Namespace, path: Path) -> str:
    """Draw the calibration windows with our own sampler, save them (int64 ``input_ids``), return their sha256."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from tasks.common.files import atomic_write
    from tasks.data.sampling import calibration_windows, tokens_sha256

    tokenizer = AutoTokenizer.from_pretrained(dense)
    tokens = calibration_windows(args.calibration, tokenizer, nsamples=args.nsamples, seqlen=args.seqlen,
                                 seed=args.seed, data_dir=args.data_dir).to(torch.int64).contiguous()
    atomic_write(path, lambda p: save_file({"input_ids": tokens}, str(p)))
    return tokens_sha256(tokens)


def evaluate(folder: Path, name: str, args: argparse.Namespace, env: dict[str, str], work: Path) -> dict[str, float]:
    """WikiText-2 and C4 perplexity of a model folder, the same command for every model."""
    results = measure_perplexity(folder, list(EVAL_SETS), work / f"ppl-{name}.json", args, env, work)
    return {f"{eval_set}_ppl": results[eval_set] for eval_set in EVAL_SETS}


def prune_theirs(method: str, pattern: str, python: Path, dense: Path, tokens: Path, output: Path,
                 args: argparse.Namespace, env: dict[str, str], work: Path, variant: str = "none",
                 check: bool = True) -> tuple[float, float | None, str, int]:
    command = [str(python), str(WORKER), "--model", str(dense), "--tokens", str(tokens), "--method", method,
               "--pattern", pattern, "--variant", variant, "--output", str(output), "--threads", str(args.threads)]
    return run_measured(command, env, work, check=check)


def prune_ours(method: str, pattern: str | None, dense: Path, output: Path, args: argparse.Namespace,
               env: dict[str, str], work: Path, tokens_sha256: str,
               batch_size: int | None = None, extra: Iterable[str] = ()) -> tuple[float, float | None, dict[str, Any]]:
    """One ``alps prune`` run on an empty cache (``extra``: more of its options; ``pattern`` None when they name
    the pattern, as ``--structured`` does); stops unless its report names the windows ``tokens_sha256`` (the ones
    given to llm-compressor)."""
    cache = work / f"cache-{output.name}"
    shutil.rmtree(cache, ignore_errors=True)  # a fresh cache: no calibration capture is reused
    command = [ALPS, "prune", "--model", str(dense), "--method", method,
               *(["--pattern", pattern] if pattern is not None else []), "--calib", args.calibration,
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed),
               "--output", str(output), "--cache-dir", str(cache), "--threads", str(args.threads), "--overwrite",
               "--no-eval"]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    if batch_size is not None:
        command += ["--batch-size", str(batch_size)]
    if args.solve_workers > 1:
        command += ["--solve-workers", str(args.solve_workers)]
    command += list(extra)
    try:
        seconds, peak, _, _ = run_measured(command, env, work)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    report = json.loads((output / "prune_report.json").read_text())
    used = (report.get("calibration") or {}).get("tokens_sha256")
    if used != tokens_sha256:
        raise RuntimeError(f"{output.name}: our run calibrated on windows with sha256 {used}, not "
                           f"{tokens_sha256} (the windows given to llm-compressor)")
    return seconds, peak, report


def _last_error_line(log: str) -> str:
    lines = [line.strip() for line in log.splitlines()
             if line.strip() and not line.startswith("MAXRSS_KB") and not line.startswith(" ")]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b", line)]
    return (errors or lines or ["(no output)"])[-1][:500]


def check_known_issues(python: Path, dense: Path, tokens: Path, args: argparse.Namespace, env: dict[str, str],
                       work: Path) -> dict[str, dict[str, Any]]:
    """Run each known-issue configuration once at 0.5 and record what actually happened."""
    issues = {}
    dense_sparsity = measure_sparsity(dense, dense)["sparsity"]
    for key, method, variant, expected, cause in KNOWN_ISSUES:
        output = work / f"issue-{key}"
        seconds, _, log, code = prune_theirs(method, "0.5", python, dense, tokens, output, args, env, work,
                                             variant=variant, check=False)
        issue: dict[str, Any] = {"method": method, "variant": variant, "pattern": "0.5", "expected": expected,
                                 "cause": cause, "exit_code": code, "wall_seconds": seconds}
        if code:
            issue["error"] = _last_error_line(log)
            issue["traceback_tail"] = log[log.rfind("Traceback"):].splitlines()[-12:] if "Traceback" in log else []
            issue["observed"] = f"crashed: {issue['error']}"
        else:
            issue.update(worker_result(log), **measure_sparsity(output, dense))
            changed = issue["changed_tensors"]
            issue["observed"] = (f"decoder linears {issue['sparsity']:.2%} sparse (dense model: {dense_sparsity:.2%}); "
                                 "other tensors " + ("untouched" if not changed else "; ".join(changed[:4])))
        shutil.rmtree(output, ignore_errors=True)
        issues[key] = issue
        print(f"known issue {key}: {issue['observed']}", flush=True)
    return issues


def sparsegpt_batch_check(dense: Path, args: argparse.Namespace, env: dict[str, str], work: Path,
                          tokens_sha256: str) -> dict[str, Any]:
    """Our SparseGPT at the target pattern with other calibration batch sizes: how much batching alone (the
    rounding of H's float sums and of the batched block forward passes) moves the perplexity, and our result
    when the windows go through one at a time, as llm-compressor feeds them."""
    runs = []
    for batch_size in BATCH_CHECK_SIZES:
        name = f"ours-sparsegpt-{TARGET_PATTERN}-batch{batch_size}"
        folder = work / name
        seconds, _, report = prune_ours("sparsegpt", TARGET_PATTERN, dense, folder, args, env, work, tokens_sha256,
                                        batch_size=batch_size)
        runs.append({"batch_size": batch_size, **evaluate(folder, name, args, env, work), "wall_seconds": seconds,
                     "tool_seconds": report["seconds"]})
        shutil.rmtree(folder, ignore_errors=True)
        print(f"SparseGPT batch check: batch size {batch_size}: WikiText-2 {runs[-1]['wikitext2_ppl']:.3f}, "
              f"C4 {runs[-1]['c4_ppl']:.3f}", flush=True)
    return {"pattern": TARGET_PATTERN, "default_batch_size": RuntimeConfig.model_fields["batch_size"].default,
            "runs": runs}


def sparsegpt_layer_check(python: Path, dense: Path, args: argparse.Namespace, env: dict[str, str],
                          work: Path) -> dict[str, Any]:
    """Both SparseGPTs on the same real layer problems: separates the algorithm from the pipelines around it."""
    import torch
    from safetensors.torch import load_file, save_file

    from alps_solver import solve
    from bench.layer_bench import capture_problems
    from tasks.common.files import atomic_write

    capture = argparse.Namespace(model=str(dense), calibration=args.calibration, data_dir=args.data_dir,
                                 nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                 blocks=LAYER_CHECK_BLOCKS,
                                 layers=LAYER_CHECK_LAYERS)
    torch.set_num_threads(args.threads)
    problems = capture_problems(capture)
    tensors = {}
    for name, problem in problems.items():
        tensors[f"{name}.weight"] = problem.weight.contiguous()
        tensors[f"{name}.gram"] = problem.gram.contiguous()
    source, output = work / "layer-problems.safetensors", work / "layer-problems-theirs.safetensors"
    atomic_write(source, lambda path: save_file(tensors, str(path)))
    patterns = list(args.patterns)
    run_measured([str(python), str(LAYER_WORKER), "--problems", str(source), "--patterns", *patterns, "--output",
         str(output), "--threads", str(args.threads)], env, work)
    pruned = load_file(str(output))
    ours, theirs = {}, {}
    for pattern in patterns:
        for name, problem in problems.items():
            key = f"{pattern}|{name}"
            ours[key] = solve(problem, pattern, method="sparsegpt").rel_error
            theirs[key] = problem.rel_error(pruned[key])
    for path in (source, output):
        path.unlink(missing_ok=True)
    return {"blocks": LAYER_CHECK_BLOCKS, "layers": len(problems), "ours": ours, "theirs": theirs,
            "summary": summarise_layer_check(ours, theirs)}


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_calibration_options(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patterns", nargs="*", default=["0.5", "0.7", "0.8", "2:4"])
    parser.add_argument("--ppl-windows", type=int, default=4, help="windows of 2048 tokens per evaluation set")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of both tools")
    parser.add_argument("--solve-workers", type=int, default=1,
                        help="our runs solve this many of a block's layers at a time (alps prune --solve-workers; "
                             "the --threads are shared among them)")
    parser.add_argument("--layer-check", action="store_true",
                        help="also run both SparseGPTs on the same real layer problems (W, H)")
    parser.add_argument("--batch-check", action="store_true",
                        help=f"also run our SparseGPT at {TARGET_PATTERN} with calibration batch sizes "
                             f"{', '.join(map(str, BATCH_CHECK_SIZES))} "
                             "(1 feeds H window by window, as llm-compressor)")
    parser.add_argument("--llmc-venv", default=str(REPO / "bench" / ".venv-llmcompressor"),
                        help="llm-compressor's virtual environment (created and installed if it has no bin/python)")
    parser.add_argument("--work", default=None, help="folder for the models and caches (default: temporary, "
                        "removed at the end)")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "compare_llmcompressor.json"),
                        help="results JSON; the markdown table and the plot go beside it (.md, .png)")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --output, run the rest")
    parser.add_argument("--keep-models", action="store_true", help="keep the pruned model folders")
    parser.add_argument("--check-known-issues", action="store_true",
                        help="also run llm-compressor's magnitude modifier, OWL option and exact lm_head ignore once")
    args = parser.parse_args()
    if args.data_dir:
        args.data_dir = str(Path(args.data_dir).resolve())

    temporary_work = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="alps-vs-llmc-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    output = Path(args.output).resolve()
    env = isolated_env(work, args.threads)
    python = ensure_llmc_venv(Path(args.llmc_venv).resolve())
    print(f"work folder {work}", flush=True)

    dense = materialise_dense(args.model, work)
    tokens = work / "calibration.safetensors"
    settings = {**vars(args), "ppl_seqlen": PPL_SEQLEN, "dense_folder": str(dense),
                "tokens_sha256": save_calibration(dense, args, tokens),
                "versions": {OURS: our_versions(), THEIRS: llmc_versions(python, env, work)},
                "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                            "processor": platform.processor()}}
    record: dict[str, Any] = {"settings": settings, "dense": None, "runs": [], "targets": [], "known_issues": {}}
    if args.resume and output.is_file():
        previous = json.loads(output.read_text())
        changed = [k for k in RESULT_SETTINGS if previous["settings"].get(k) != settings[k]]
        if changed:
            raise SystemExit(f"--resume: {output} was made with other {changed}; use another --output")
        record.update(dense=previous.get("dense"), known_issues=previous.get("known_issues") or {},
                      sparsegpt_layer_check=previous.get("sparsegpt_layer_check"),
                      sparsegpt_batch_check=previous.get("sparsegpt_batch_check"),
                      runs=[r for r in previous["runs"] if r["pattern"] in args.patterns])
    done = {(r["pattern"], r["tool"], r["method"]) for r in record["runs"]}

    def save() -> None:
        record["targets"] = compute_targets(record["runs"], batch_check=record.get("sparsegpt_batch_check"))
        atomic_write_json(output, record)

    if record["dense"] is None:
        started = time.perf_counter()
        record["dense"] = {**evaluate(dense, "dense", args, env, work), "eval_seconds": time.perf_counter() - started,
                           "sparsity": measure_sparsity(dense, dense)["sparsity"]}
        save()
    print(f"dense: WikiText-2 {record['dense']['wikitext2_ppl']:.3f}, C4 {record['dense']['c4_ppl']:.3f}", flush=True)

    if args.check_known_issues and not record["known_issues"]:
        record["known_issues"] = check_known_issues(python, dense, tokens, args, env, work)
        save()

    if args.layer_check and not record.get("sparsegpt_layer_check"):
        record["sparsegpt_layer_check"] = sparsegpt_layer_check(python, dense, args, env, work)
        save()
        for pattern, row in record["sparsegpt_layer_check"]["summary"].items():
            print(f"SparseGPT layer check {pattern}: our error / theirs mean {row['mean_ratio']:.4f} "
                  f"(min {row['min_ratio']:.4f}, max {row['max_ratio']:.4f}) over {row['layers']} layers", flush=True)

    if args.batch_check and not record.get("sparsegpt_batch_check"):
        record["sparsegpt_batch_check"] = sparsegpt_batch_check(dense, args, env, work, settings["tokens_sha256"])
        save()

    order = run_order(args.patterns)
    for number, (pattern, tool, method) in enumerate(order, start=1):
        if (pattern, tool, method) in done:
            continue
        name = f"{'ours' if tool == OURS else 'theirs'}-{method}-{pattern.replace(':', 'of')}"
        folder = work / name
        if tool == THEIRS:
            seconds, peak, log, _ = prune_theirs(method, pattern, python, dense, tokens, folder, args, env, work)
            result = worker_result(log)
            if result["tokens_sha256"] != settings["tokens_sha256"]:
                raise RuntimeError(f"{name}: llm-compressor read windows with sha256 {result['tokens_sha256']}, "
                                   f"not {settings['tokens_sha256']}")
            details = {"tool_seconds": result["oneshot_seconds"], "feeding": result["feeding"],
                       "modifier_arguments": result["modifier_arguments"],
                       "stripped_config_keys": result["stripped_config_keys"]}
        else:
            seconds, peak, report = prune_ours(method, pattern, dense, folder, args, env, work,
                                               settings["tokens_sha256"])
            details = {"tool_seconds": report["seconds"], "mean_layer_error": report["mean_rel_error"],
                       "solve_workers": args.solve_workers}
        measured = measure_sparsity(folder, dense)
        if not measured["untouched_other_tensors"]:
            print(f"WARNING {name}: tensors other than the decoder linears differ from the dense model: "
                  f"{measured['changed_tensors'][:5]}", flush=True)
        started = time.perf_counter()
        perplexity = evaluate(folder, name, args, env, work)
        row = {"tool": tool, "method": method, "pattern": pattern, "wall_seconds": seconds, "peak_rss_mb": peak,
               **measured, **perplexity, "eval_seconds": time.perf_counter() - started, **details}
        record["runs"].append(row)
        save()
        if not args.keep_models:
            shutil.rmtree(folder, ignore_errors=True)
        print(f"[{number}/{len(order)}] {pattern:>4} {tool:14s} {method:11s} WikiText-2 {row['wikitext2_ppl']:9.3f} "
              f"C4 {row['c4_ppl']:9.3f}  sparsity {row['sparsity']:.4f}  wall {seconds:6.0f} s  "
              f"tool {row['tool_seconds']:6.0f} s  peak {peak or 0:6.0f} MB", flush=True)

    save()
    markdown = render_markdown(record)
    atomic_write_text(output.with_suffix(".md"), markdown)
    plot_results(record, output.with_suffix(".png"))
    print(markdown)
    for target in record["targets"]:
        ratio = "-" if target["ratio"] is None else f"{target['ratio']:.3f}"
        print(f"{_verdict(target['passed'])}  {target['target']} at {target['pattern']}: {ratio} ({target['bound']})")
    print(f"results: {output}, {output.with_suffix('.md')}, {output.with_suffix('.png')}", flush=True)
    if temporary_work and not args.keep_models:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
