"""Model benchmark: prune the bundled model with several methods and patterns, then measure perplexity.

Each configuration runs the real pruning flow (`alps prune`) in its own process, so wall time and peak
memory (the process's peak RSS) are those of one user run; then the pruned model's WikiText-2
perplexity is measured with the papers' protocol. All runs share one cache folder, so the calibration
capture is computed once and reused, as a user's sweep would; the first run's time includes it.
Results are appended to a JSON file as each run finishes, and a markdown table is printed at the end.

    python bench/prune_bench.py --data-dir ../shared/data --nsamples 32 --seqlen 512 --ppl-windows 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.processes import ALPS, add_calibration_options, measure_perplexity, run_measured  # noqa: E402
from tasks.common.files import atomic_write_json  # noqa: E402

# Settings that decide the numbers: a resumed file must have been made with the same ones.
RESULT_SETTINGS = ("model", "calibration", "data_dir", "nsamples", "seqlen", "ppl_windows", "threads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_calibration_options(parser)
    parser.add_argument("--methods", nargs="+", default=["alps", "sparsegpt", "wanda", "magnitude"])
    parser.add_argument("--patterns", nargs="+", default=["0.5", "0.7", "2:4"])
    parser.add_argument("--ppl-windows", type=int, default=16, help="WikiText-2 windows of 2048 tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default=None, help="folder for cache and pruned models (default: temporary)")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "prune_bench.json"))
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --output, run the rest")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="alps-prune-bench-"))
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90", OMP_NUM_THREADS=str(args.threads))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {"settings": vars(args), "runs": []}
    if args.resume and output.is_file():
        previous = json.loads(output.read_text())
        changed = [k for k in RESULT_SETTINGS if previous["settings"].get(k) != getattr(args, k)]
        if changed:
            raise SystemExit(f"--resume: {output} was made with other {changed}; use another --output")
        record["runs"] = [r for r in previous["runs"] if r["method"] in args.methods and r["pattern"] in args.patterns]
        record["dense_wikitext2_ppl"] = previous["dense_wikitext2_ppl"]
    done = {(row["method"], row["pattern"]) for row in record["runs"]}

    if "dense_wikitext2_ppl" not in record:
        record["dense_wikitext2_ppl"] = measure_perplexity(args.model, ["wikitext2"], work / "ppl-dense.json", args,
                                                           env)["wikitext2"]
    dense = record["dense_wikitext2_ppl"]
    print(f"dense WikiText-2 perplexity {dense:.3f}", flush=True)

    for pattern in args.patterns:
        for method in args.methods:
            if (method, pattern) in done:
                continue
            name = f"{method}-{pattern.replace(':', 'of')}"
            command = [
                ALPS, "prune", "--model", args.model, "--method", method, "--pattern", pattern,
                "--calib", args.calibration, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                "--output", str(work / name), "--cache-dir", str(work / "cache"), "--threads", str(args.threads),
                "--overwrite", "--no-eval",  # perplexity is measured below, the same way for every run
            ] + (["--data-dir", args.data_dir] if args.data_dir else [])
            seconds, peak_mb, _, _ = run_measured(command, env)
            ppl = measure_perplexity(work / name, ["wikitext2"], work / f"ppl-{name}.json", args, env)["wikitext2"]
            report = json.loads((work / name / "prune_report.json").read_text())
            row = {"method": method, "pattern": pattern, "wall_seconds": seconds, "peak_rss_mb": peak_mb,
                   "wikitext2_ppl": ppl, "mean_layer_error": report["mean_rel_error"],
                   "solve_seconds": report["seconds"]}
            record["runs"].append(row)
            atomic_write_json(output, record)
            print(f"{pattern:>5} {method:10s} ppl {ppl:9.3f}  layer error {row['mean_layer_error']:.5f}  "
                  f"wall {seconds:6.0f} s  peak {peak_mb or 0:6.0f} MB", flush=True)

    lines = [f"Dense WikiText-2 perplexity: {dense:.2f}", "",
             "| pattern | method | WikiText-2 ppl | mean layer error | wall time (s) | peak RSS (MB) |",
             "|---|---|---|---|---|---|"]
    order = {(pattern, method): i for i, (pattern, method) in
             enumerate((p, m) for p in args.patterns for m in args.methods)}
    for row in sorted(record["runs"], key=lambda r: order[(r["pattern"], r["method"])]):
        lines.append(f"| {row['pattern']} | {row['method']} | {row['wikitext2_ppl']:.2f} | "
                     f"{row['mean_layer_error']:.4f} | {row['wall_seconds']:.0f} | {row['peak_rss_mb'] or 0:.0f} |")
    record["table"] = "\n".join(lines)
    atomic_write_json(output, record)
    print(record["table"])


if __name__ == "__main__":
    main()
