"""Evaluation benchmark: zero-shot accuracy and perplexity of the dense model and pruned folders.

Runs `alps eval` on each model (waiting for a folder that another job is still writing), with the same
settings for all, and prints a markdown table; results go to one JSON file, written after each model.

    python bench/eval_bench.py --data-dir ../shared/data --limit 100 --max-windows 8 \
        --models smollm2-135m=dense /tmp/prune-bench2/alps-0.7=alps-0.7 /tmp/prune-bench2/sparsegpt-0.7=sparsegpt-0.7
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ALPS = str(Path(sys.executable).with_name("alps"))

from tasks.common.files import atomic_write_json  # noqa: E402

TASKS = ["piqa", "arc_easy", "arc_challenge", "lambada"]
PERPLEXITY = ["wikitext2", "ptb", "c4"]


def _is_path(reference: str) -> bool:
    return reference.startswith(("/", ".", "~")) or Path(reference).exists()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="reference=label pairs (a folder still being "
                        "written is waited for when given as an absolute or ./ path)")
    parser.add_argument("--data-dir", default=os.environ.get("ALPS_DATA_DIR"))
    parser.add_argument("--limit", type=int, default=100, help="items per zero-shot task")
    parser.add_argument("--max-windows", type=int, default=8, help="perplexity windows of 2048 tokens per set")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wait", type=int, default=7200, help="seconds to wait for a pruned folder to appear")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "eval_bench.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="alps-eval-bench-"))
    record = {"settings": {k: v for k, v in vars(args).items() if k != "output"}, "models": []}
    for pair in args.models:
        reference, _, label = pair.partition("=")
        deadline = time.monotonic() + args.wait
        # A model folder is written whole and renamed into place: once its config.json is there, it is complete.
        # Anything that is not a path (a bundled model's name, a hub id) is there already.
        while _is_path(reference) and not (Path(reference) / "config.json").is_file():
            if time.monotonic() > deadline:
                raise SystemExit(f"{reference} did not appear within {args.wait} s")
            time.sleep(20)
        out = work / f"{label}.json"
        command = [ALPS, "eval", "--model", reference, "--ppl", ",".join(PERPLEXITY), "--tasks", ",".join(TASKS),
                   "--limit", str(args.limit), "--max-windows", str(args.max_windows), "--threads", str(args.threads),
                   "--output", str(out)] + (["--data-dir", args.data_dir] if args.data_dir else [])
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        result = json.loads(out.read_text())
        record["models"].append({"label": label, "reference": reference, "seconds": time.perf_counter() - started,
                                 "perplexity": result["perplexity"], "accuracy": result["accuracy"]})
        atomic_write_json(Path(args.output), record)
        print(label, result["perplexity"], result["accuracy"], flush=True)

    lines = ["| model | " + " | ".join(f"{t} acc" for t in TASKS) + " | " + " | ".join(f"{p} ppl" for p in PERPLEXITY)
             + " |", "|---" * (1 + len(TASKS) + len(PERPLEXITY)) + "|"]
    for model in record["models"]:
        cells = [f"{model['accuracy'].get(t, float('nan')):.3f}" for t in TASKS]
        cells += [f"{model['perplexity'].get(p, float('nan')):.2f}" for p in PERPLEXITY]
        lines.append(f"| {model['label']} | " + " | ".join(cells) + " |")
    record["table"] = "\n".join(lines)
    atomic_write_json(Path(args.output), record)
    print(record["table"])


if __name__ == "__main__":
    main()
