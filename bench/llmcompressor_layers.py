"""llm-compressor's SparseGPT on given layer problems (W, H): the layer-level half of the SparseGPT check in
``bench/compare_llmcompressor.py --layer-check``.

Runs with the python of llm-compressor's virtual environment and imports only torch, safetensors,
llmcompressor and the standard library. ``--problems`` is a safetensors file with ``NAME.weight`` (d_out,
d_in) and ``NAME.gram`` (d_in, d_in, X^T X) per layer; for every pattern and layer this calls
llm-compressor's own ``sparsify_weight`` (the function its SparseGPTModifier applies to each module, with the
modifier's defaults: block size 128, dampening 0.01) on that exact W and H and saves the pruned weight as
``PATTERN|NAME`` in ``--output``. The last line printed is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import time

RESULT_PREFIX = "RESULT "
BLOCK_SIZE = 128  # SparseGPTModifier.block_size default
DAMPENING = 0.01  # SparseGPTModifier.dampening_frac default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", required=True)
    parser.add_argument("--patterns", nargs="+", required=True, help="'0.7' or '2:4' (2 kept in every 4)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight
    from safetensors.torch import load_file, save_file

    if args.threads:
        torch.set_num_threads(args.threads)
    tensors = load_file(args.problems)
    names = sorted(key.removesuffix(".weight") for key in tensors if key.endswith(".weight"))
    pruned, started = {}, time.perf_counter()
    for pattern in args.patterns:
        if ":" in pattern:
            kept, group = (int(part) for part in pattern.split(":"))
            sparsity, prune_n, prune_m = (group - kept) / group, group - kept, group  # theirs counts pruned
        else:
            sparsity, prune_n, prune_m = float(pattern), 0, 0
        for name in names:
            W = tensors[f"{name}.weight"].to(torch.float32)
            layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
            layer.weight.data = W.clone()
            hessians = {layer: tensors[f"{name}.gram"].to(torch.float32)}
            _, weight = sparsify_weight(layer, hessians, sparsity, prune_n, prune_m, BLOCK_SIZE, DAMPENING, False)
            pruned[f"{pattern}|{name}"] = weight.detach().contiguous()
    temporary = f"{args.output}.{os.getpid()}.tmp"
    save_file(pruned, temporary)
    os.replace(temporary, args.output)
    print(RESULT_PREFIX + json.dumps({"layers": len(names), "patterns": args.patterns,
                                      "seconds": time.perf_counter() - started,
                                      "llmcompressor": importlib.metadata.version("llmcompressor")}), flush=True)


if __name__ == "__main__":
    main()
