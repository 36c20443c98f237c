"""Layer benchmark: every solver method on real layer problems (W, H) of the bundled model.

Captures the inputs of a few decoder blocks of SmolLM2-135M on C4 train windows (dense model, as the
pruning flow does), builds each chosen linear layer's problem, and runs each method at each pattern.
Prints a table of mean relative error and seconds per (method, pattern), the ALPS/SparseGPT ratios the
issues set targets for, and the ADMM iteration's achieved matmul rate next to the machine's; writes all
of it as JSON.

    python bench/layer_bench.py --data-dir ../shared/data --nsamples 32 --seqlen 512 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alps_solver import LayerProblem, Result, solve  # noqa: E402
from alps_solver.admm import AdmmOutcome  # noqa: E402
from alps_solver.problem import gram_matrix_flops  # noqa: E402
from alps_solver.result import clock  # noqa: E402
from bench.problems import load_problems, save_problems  # noqa: E402
from tasks.common.files import atomic_write_json  # noqa: E402

METHODS = ["alps", "alps-simple", "sparsegpt", "wanda", "magnitude", "dsnot", "admm_fixed_mask",
           "admm_fixed_rho@rho=0.3", "admm_fixed_rho@rho=3"]


def parse_method(spec: str) -> tuple[str, dict]:
    """``name`` or ``name@key=value,key=value`` (values as JSON where they parse)."""
    name, _, settings = spec.partition("@")
    config = {}
    for pair in filter(None, settings.split(",")):
        key, _, raw = pair.partition("=")
        try:
            config[key] = json.loads(raw)
        except json.JSONDecodeError:
            config[key] = raw
    return name, config


PATTERNS = ["0.5", "0.6", "0.7", "0.8", "0.9", "2:4"]
BLOCKS = [0, 15, 29]
LAYERS = ["q_proj", "o_proj", "up_proj", "down_proj"]
CAPTURE_SETTINGS = ("model", "calibration", "data_dir", "nsamples", "seqlen", "seed", "blocks", "layers")


def problems_for(args: argparse.Namespace) -> dict[str, LayerProblem]:
    """The layer problems the options name: loaded from ``--problems`` (whose capture settings then replace
    the command line's), else captured, and written to ``--save-problems`` if given."""
    if args.problems and args.save_problems:
        raise SystemExit("--problems and --save-problems: give one (load problems, or capture and save them)")
    if not args.problems:
        args.blocks, args.layers = args.blocks or BLOCKS, args.layers or LAYERS
        problems = capture_problems(args)
        if args.save_problems:
            save_problems(args.save_problems, problems, {key: getattr(args, key) for key in CAPTURE_SETTINGS})
        return problems
    problems, captured = load_problems(args.problems)
    held_blocks = captured.get("blocks") or sorted({block_of(name) for name in problems})
    held_layers = captured.get("layers") or list(dict.fromkeys(layer_of(name) for name in problems))
    blocks, layers = args.blocks or held_blocks, args.layers or held_layers
    for key in CAPTURE_SETTINGS:
        setattr(args, key, captured.get(key))
    args.blocks, args.layers = blocks, layers
    chosen = {name: p for name, p in problems.items() if block_of(name) in blocks and layer_of(name) in layers}
    present = {(block_of(name), layer_of(name)) for name in chosen}
    missing = [f"block {b} {layer}" for b in blocks for layer in layers if (b, layer) not in present]
    if missing:
        raise SystemExit(f"--problems {args.problems} lacks {', '.join(missing)} (it holds blocks {held_blocks}, "
                         f"layers {held_layers}); capture them with --save-problems")
    return chosen


def block_of(name: str) -> int:
    return int(name[len("block"):name.index(".")])  # "block15.mlp.up_proj" -> 15


def layer_of(name: str) -> str:
    return name.rsplit(".", 1)[-1]  # "block15.mlp.up_proj" and "mlp.up_proj" -> "up_proj"


def capture_problems(args: argparse.Namespace) -> dict[str, LayerProblem]:
    """Capture the chosen layers' problems from the bundled model (needs our full stack and the data)."""
    from transformers import AutoTokenizer

    from tasks.blockwise.capture import capture_block_inputs, run_block
    from tasks.blockwise.gram import collect_layer_problems
    from tasks.data.sampling import calibration_windows
    from tasks.model.adapters import build_block, linear_names
    from tasks.model.references import locate_model

    folder = Path(locate_model(args.model).location)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokens = calibration_windows(args.calibration, tokenizer, nsamples=args.nsamples, seqlen=args.seqlen,
                                 seed=args.seed, data_dir=args.data_dir)
    device = torch.device("cpu")
    inputs = capture_block_inputs(folder, tokens, device=device, batch_size=4)
    problems = {}
    for index in range(max(args.blocks) + 1):
        block = build_block(folder, index, torch.float32, device)
        if index in args.blocks:
            chosen = [n for n in linear_names(block) if layer_of(n) in args.layers]
            found = collect_layer_problems(block, inputs, chosen, batch_size=4)
            problems.update({f"block{index:02d}.{name}": p for name, p in found.items()})
        inputs.hidden = run_block(block, inputs, batch_size=4)  # dense outputs feed the next block
    return problems


def admm_flops(result: Result | AdmmOutcome, d_out: int, d_in: int) -> float:
    """Matrix-product FLOPs the ADMM iterations of an ALPS ``result`` executed.

    Every iteration's weight step is a (d_out, d_in) x (d_in, d_in) product, and so is every check's error
    of the sparse iterate and the weight step's constant term W0 H, formed once; each penalty in force for
    at least one iteration costs one symmetric (d_in, d_in) product (``gram_matrix``) to form
    (H + rho I)^-1 from the eigenbasis. A change of rho at the last iteration is never used. The one-time
    eigendecomposition is not part of the iterations (its time is ``timings["eigh"]``, outside
    ``timings["admm"]``).
    """
    builds = 1 + sum(1 for u in result.rho_updates if u.iteration < result.iterations and u.new != u.old)
    products = result.iterations + len(result.history) + 1
    return 2.0 * d_in * d_in * products * d_out + builds * gram_matrix_flops(d_in, d_in)


def matmul_rate(d_out: int, d_in: int, device: torch.device = torch.device("cpu"), repeats: int = 20) -> float:
    """Measured GFLOP/s of the ADMM weight step's product (d_out, d_in) x (d_in, d_in), float32."""
    A, B = torch.randn(d_out, d_in, device=device), torch.randn(d_in, d_in, device=device)
    A @ B
    start = clock(device)
    for _ in range(repeats):
        A @ B
    return 2 * d_out * d_in * d_in * repeats / (clock(device) - start) / 1e9


def on_device(problems: dict[str, LayerProblem], device: torch.device) -> dict[str, LayerProblem]:
    """The problems on ``device``, each tensor moved once: layers that shared an H tensor still do."""
    moved: dict[int, torch.Tensor] = {}  # id of a tensor -> its copy on the device

    def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else moved.setdefault(id(tensor), tensor.to(device))

    return {name: LayerProblem(weight=move(p.weight), gram=move(p.gram), input_mean=move(p.input_mean),
                               input_var=move(p.input_var), n_tokens=p.n_tokens) for name, p in problems.items()}


def add_capture_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``capture_problems`` (model, calibration, blocks) and of where the solves run."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calibration", default="c4")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    parser.add_argument("--blocks", type=int, nargs="+", default=None, help=f"default {BLOCKS}")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu",
                        help="where the solves run (cpu, cuda, cuda:1); problems are captured on the CPU, then moved")
    parser.add_argument("--save-problems", default=None, metavar="FILE",
                        help="after capturing, write the problems to FILE (safetensors), for --problems elsewhere")
    parser.add_argument("--problems", default=None, metavar="FILE",
                        help="solve the problems in FILE instead of capturing (no model or data needed)")


def solve_device(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads``; the ``--device`` the solves run on, refused if torch cannot see it."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device here; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args.device = str(device)  # as recorded and compared by --merge: cuda is cuda:0
    return device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_capture_arguments(parser)
    parser.add_argument("--layers", nargs="+", default=None, help=f"default {LAYERS}")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--patterns", nargs="+", default=PATTERNS)
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "layer_bench.json"))
    parser.add_argument("--merge", action="store_true",
                        help="add these methods' rows to --output's (same problems and settings otherwise)")
    args = parser.parse_args()
    device = solve_device(args)

    started = time.perf_counter()
    problems = on_device(problems_for(args), device)
    print(f"{'loaded' if args.problems else 'captured'} {len(problems)} layer problems from blocks {args.blocks} "
          f"({args.nsamples} windows of {args.seqlen} tokens of {args.calibration}) "
          f"in {time.perf_counter() - started:.0f} s; solving on {device}", flush=True)

    rows = []
    for pattern in args.patterns:
        for method in args.methods:
            errors, seconds, iteration_rates, machine_rates, timings = [], [], [], [], {}
            method_name, method_config = parse_method(method)
            if device.type == "cuda":  # the first calls on a GPU set up libraries and kernels: keep them out
                solve(next(iter(problems.values())), pattern, method=method_name, config=method_config)
            for problem in problems.values():
                result = solve(problem, pattern, method=method_name, config=method_config)
                errors.append(result.rel_error)
                seconds.append(result.seconds)
                for phase, spent in result.timings.items():
                    timings[phase] = timings.get(phase, 0.0) + spent / len(problems)
                if method.startswith("alps") and result.iterations:
                    d_out, d_in = problem.weight.shape
                    iteration_rates.append(admm_flops(result, d_out, d_in) / result.timings["admm"] / 1e9)
                    machine_rates.append(matmul_rate(d_out, d_in, device))
            row = {"method": method, "pattern": pattern, "layers": len(errors),
                   "mean_rel_error": sum(errors) / len(errors), "mean_seconds": sum(seconds) / len(seconds),
                   "mean_timings": timings, "errors": errors, "seconds": seconds}
            if iteration_rates:
                row["admm_gflops"] = sum(iteration_rates) / len(iteration_rates)
                row["matmul_gflops"] = sum(machine_rates) / len(machine_rates)
            rows.append(row)
            print(f"{pattern:>5} {method:16s} error {row['mean_rel_error']:.5f}  seconds {row['mean_seconds']:.3f}"
                  + (f"  ADMM {row['admm_gflops']:.0f} of {row['matmul_gflops']:.0f} GFLOP/s"
                     if iteration_rates else ""),
                  flush=True)

    if args.merge and Path(args.output).is_file():
        previous = json.loads(Path(args.output).read_text())
        same = ("model", "calibration", "nsamples", "seqlen", "seed", "blocks", "layers", "patterns", "threads",
                "device")
        # Files written before --device existed were all measured on the CPU.
        changed = [k for k in same if previous["settings"].get(k, "cpu" if k == "device" else None) != getattr(args, k)]
        if changed:
            raise SystemExit(f"--merge: {args.output} was made with other {changed}; use another --output")
        rows = [r for r in previous["rows"] if r["method"] not in args.methods] + rows
        args.methods = list(dict.fromkeys(previous["settings"]["methods"] + args.methods))  # columns keep their order

    def cell(method: str, pattern: str) -> dict:
        return next(r for r in rows if r["method"] == method and r["pattern"] == pattern)

    summary = {}
    if "alps" in args.methods and "sparsegpt" in args.methods:
        for pattern in args.patterns:
            a, s = cell("alps", pattern), cell("sparsegpt", pattern)
            per_layer = [x / y for x, y in zip(a["errors"], s["errors"])]
            summary[pattern] = {"alps_over_sparsegpt_error": a["mean_rel_error"] / s["mean_rel_error"],
                                # the same ratio layer by layer (the paper's 0.62x is one layer's)
                                "alps_over_sparsegpt_error_per_layer": {
                                    "mean": sum(per_layer) / len(per_layer), "min": min(per_layer),
                                    "max": max(per_layer)},
                                "alps_over_sparsegpt_seconds": a["mean_seconds"] / s["mean_seconds"]}
            if "alps-simple" in args.methods:
                summary[pattern]["alps_simple_over_sparsegpt_seconds"] = (
                    cell("alps-simple", pattern)["mean_seconds"] / s["mean_seconds"])
    print(json.dumps(summary, indent=1))

    lines = ["| pattern | " + " | ".join(args.methods) + " |", "|---" * (len(args.methods) + 1) + "|"]
    for pattern in args.patterns:
        cells = [f"{cell(m, pattern)['mean_rel_error']:.4f} ({cell(m, pattern)['mean_seconds']:.2f} s)"
                 for m in args.methods]
        lines.append(f"| {pattern} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "output"}
    settings["torch_threads"] = torch.get_num_threads()
    atomic_write_json(output, {"settings": settings, "rows": rows, "summary": summary, "table": table})
    print(f"wrote {output} ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
