"""What storing activations in bf16 or fp16 costs in quality: the bundled model pruned with the same settings and
each activation dtype, side by side, on the comparison's protocol (C4 calibration 32 x 512, perplexity over the
first 4 windows of 2048 tokens of WikiText-2 and C4). Every run is ``alps prune`` in its own process on its own
cache folder, so each captures its own calibration inputs in its dtype.

    python bench/activation_dtype_bench.py --data-dir ../shared/data --patterns 0.7 2:4 --threads 2
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_calibration_options(parser)
    parser.add_argument("--method", default="alps")
    parser.add_argument("--patterns", nargs="+", default=["0.7", "2:4"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--ppl-windows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=None)
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "activation_dtype_bench.json"))
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="alps-dtype-bench-"))
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90", OMP_NUM_THREADS=str(args.threads))
    record: dict = {"settings": vars(args), "runs": []}
    for pattern in args.patterns:
        for dtype in args.dtypes:  # alternated within a pattern, so drift in the machine's speed hits both
            name = f"{args.method}-{pattern.replace(':', 'of')}-{dtype}"
            command = [ALPS, "prune", "--model", args.model, "--method", args.method, "--pattern", pattern,
                       "--calib", args.calibration, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                       "--activation-dtype", dtype, "--output", str(work / name), "--cache-dir",
                       str(work / f"cache-{name}"), "--threads", str(args.threads), "--overwrite", "--no-eval",
                       ] + (["--data-dir", args.data_dir] if args.data_dir else [])
            seconds, peak_mb, _, _ = run_measured(command, env)
            ppl = measure_perplexity(work / name, ["wikitext2", "c4"], work / f"ppl-{name}.json", args, env)
            report = json.loads((work / name / "prune_report.json").read_text())
            row = {"pattern": pattern, "activation_dtype": dtype, "wall_seconds": seconds, "peak_rss_mb": peak_mb,
                   "wikitext2_ppl": ppl["wikitext2"], "c4_ppl": ppl["c4"], "mean_layer_error": report["mean_rel_error"]}
            record["runs"].append(row)
            atomic_write_json(Path(args.output), record)
            print(row, flush=True)
    lines = ["| pattern | activations | WikiText-2 ppl | C4 ppl | mean layer error | wall (s) | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['pattern']} | {r['activation_dtype']} | {r['wikitext2_ppl']:.2f} | {r['c4_ppl']:.2f} | "
              f"{r['mean_layer_error']:.5f} | {r['wall_seconds']:.0f} | {r['peak_rss_mb'] or 0:.0f} |"
              for r in record["runs"]]
    record["table"] = "\n".join(lines)
    atomic_write_json(Path(args.output), record)
    print(record["table"])


if __name__ == "__main__":
    main()
