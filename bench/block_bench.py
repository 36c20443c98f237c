"""Block benchmark: a decoder block's layer solves, each layer alone and with shared factorisations.

The layers that read the same input (q/k/v, gate/up) share H. The pipeline solves them one after another
with one ``GramCache``, so ALPS decomposes each distinct H once and SparseGPT factorises it once. This
script captures every linear layer's problem in the chosen blocks of the bundled model (dense model, as
the pruning flow sees them), then solves each block's layers both ways, alternating which goes first,
``--repeats`` times (the fastest counts), and prints the seconds per block, the saving, the seconds spent
deriving from H (eigendecomposition, factorisation) either way, and whether the weights are bit-identical;
writes it all as JSON.

    python bench/block_bench.py --data-dir ../shared/data --nsamples 32 --seqlen 512 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alps_solver import GramCache, LayerProblem, solve  # noqa: E402
from alps_solver.result import clock  # noqa: E402
from bench.layer_bench import add_capture_arguments, block_of, on_device, problems_for, solve_device  # noqa: E402
from tasks.common.files import atomic_write_json  # noqa: E402

LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DERIVED_FROM_H = ("eigh", "factorize")  # the phases of a solve (Result.timings) that a GramCache can skip


def solve_block(problems: dict, method: str, pattern: str, device: torch.device, shared: bool) -> dict:
    """Solve every layer of one block: seconds, the pruned weights, and the seconds spent deriving from H
    (ALPS's eigendecomposition, SparseGPT's factorisation). With ``shared``, one GramCache per group of
    layers that read the same H (the problems of a group hold the very same H tensor)."""
    caches: dict[int, GramCache] = {}
    weights, derived = {}, 0.0
    start = clock(device)
    for name, problem in problems.items():
        cache = caches.setdefault(id(problem.gram), GramCache()) if shared else None
        result = solve(problem, pattern, method=method, cache=cache)
        weights[name] = result.weight
        derived += sum(result.timings.get(phase, 0.0) for phase in DERIVED_FROM_H)
    return {"seconds": clock(device) - start, "weights": weights, "derived_seconds": derived}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_capture_arguments(parser)
    parser.add_argument("--methods", nargs="+", default=["alps", "alps-simple", "sparsegpt"])
    parser.add_argument("--pattern", default="0.7")
    parser.add_argument("--repeats", type=int, default=3, help="solves of each block both ways; the fastest counts")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "block_bench.json"))
    args = parser.parse_args()
    device = solve_device(args)

    started = time.perf_counter()
    args.layers = LAYERS
    captured = on_device(problems_for(args), device)  # a group's members keep sharing one H tensor
    blocks: dict[int, dict[str, LayerProblem]] = {}
    for name, problem in captured.items():
        blocks.setdefault(block_of(name), {})[name] = problem
    groups = {b: len({id(p.gram) for p in ps.values()}) for b, ps in blocks.items()}
    print(f"{'loaded' if args.problems else 'captured'} {len(captured)} layer problems from blocks {args.blocks} "
          f"({groups} distinct H per block) in {time.perf_counter() - started:.0f} s; solving on {device}", flush=True)

    rows = []
    for method in args.methods:
        # First calls set up libraries and kernels (and warm the caches of a CPU): keep them out of the timing.
        solve_block(blocks[args.blocks[0]], method, args.pattern, device, shared=False)
        for position, (block, problems) in enumerate(blocks.items()):
            runs: dict[bool, list[dict]] = {False: [], True: []}
            for repeat in range(args.repeats):  # alternate which way goes first
                for shared in ((False, True) if (position + repeat) % 2 == 0 else (True, False)):
                    runs[shared].append(solve_block(problems, method, args.pattern, device, shared))
            alone, together = (min(runs[shared], key=lambda run: run["seconds"]) for shared in (False, True))
            identical = all(torch.equal(run["weights"][n], alone["weights"][n])
                            for run in runs[False] + runs[True] for n in alone["weights"])
            rows.append({"method": method, "block": block, "seconds_alone": alone["seconds"],
                         "seconds_shared": together["seconds"], "derived_seconds_alone": alone["derived_seconds"],
                         "derived_seconds_shared": together["derived_seconds"], "identical": identical,
                         "all_seconds_alone": [run["seconds"] for run in runs[False]],
                         "all_seconds_shared": [run["seconds"] for run in runs[True]]})
            print(f"{method:12s} block {block:2d}: {alone['seconds']:6.2f} s alone, "
                  f"{together['seconds']:6.2f} s shared "
                  f"({1 - together['seconds'] / alone['seconds']:+.1%}); deriving from H "
                  f"{alone['derived_seconds']:.3f} s -> {together['derived_seconds']:.3f} s; "
                  f"weights identical: {identical}", flush=True)

    summary = {}
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        alone = sum(r["seconds_alone"] for r in mine) / len(mine)
        together = sum(r["seconds_shared"] for r in mine) / len(mine)
        derived = sum(r["derived_seconds_alone"] - r["derived_seconds_shared"] for r in mine) / len(mine)
        summary[method] = {"mean_seconds_alone": alone, "mean_seconds_shared": together,
                           "saved": 1 - together / alone, "mean_derived_seconds_saved": derived,
                           "identical": all(r["identical"] for r in mine)}
        print(f"{method:12s} mean per block (fastest of {args.repeats}): {alone:.2f} s alone, {together:.2f} s shared "
              f"({summary[method]['saved']:.1%} saved; {derived:.3f} s less deriving from H)")
    output = Path(args.output)
    settings = {k: v for k, v in vars(args).items() if k != "output"}
    settings["torch_threads"] = torch.get_num_threads()
    atomic_write_json(output, {"settings": settings, "rows": rows, "summary": summary})
    print(f"wrote {output} ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
