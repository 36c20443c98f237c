"""llm-compressor's side of ``bench/compare_llmcompressor.py``: prune one model with one llm-compressor method.

It runs with the python of llm-compressor's own virtual environment (that tool pins other versions than
ours), so it imports only torch, transformers, datasets, safetensors, llmcompressor and the standard
library, nothing from this repository.

Calibration uses exactly the token windows in ``--tokens`` (a safetensors file with int64 ``input_ids``
of shape (n, seqlen)), in their order, one window per batch. They are handed to ``oneshot`` as a ready
DataLoader: given a ``datasets.Dataset`` instead, oneshot orders samples with its ``LengthAwareSampler``
even with ``shuffle_calibration_samples=False``, an argsort of the (all equal) lengths that is not stable
(for 32 windows it starts 16, 31, 30, ...). A hook on the input embedding records what the model is fed,
and the run fails unless every calibration pass saw our windows in our order.

The pruned model is saved as a plain dense Hugging Face safetensors folder (no compressed format, no
quantization or sparsity config) that transformers loads without compressed-tensors, with the input
folder's tokenizer files. The last line printed is ``RESULT {json}``.

    V/bin/python bench/llmcompressor_worker.py --model DENSE --tokens work/calibration.safetensors \\
        --method sparsegpt --pattern 0.7 --output work/theirs-sparsegpt-0.7 --threads 2
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

RESULT_PREFIX = "RESULT "
METHODS = ("sparsegpt", "wanda", "magnitude")
# Variants reproduce llm-compressor behaviour the comparison reports as known issues.
VARIANTS = ("none", "owl", "ignore-exact-lm-head")
MODIFIER_CLASSES = {
    "sparsegpt": ("llmcompressor.modifiers.pruning.sparsegpt", "SparseGPTModifier"),
    "wanda": ("llmcompressor.modifiers.pruning.wanda", "WandaPruningModifier"),
    "magnitude": ("llmcompressor.modifiers.pruning.magnitude", "MagnitudePruningModifier"),
}
# The decoder layers' linear weights; a regex because llm-compressor matches module names with re.match.
DECODER_LINEARS = r"re:.*layers\.\d+\.(self_attn|mlp)\.\w+_proj$"
# The OWL paper's defaults (Yin et al. 2023): outlier threshold M = 5, sparsity spread lambda = 0.08.
OWL_M = 5
OWL_LAMBDA = 0.08
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")
# config.json keys through which a saved folder would need compressed-tensors to load.
COMPRESSION_CONFIG_KEYS = ("quantization_config", "compression_config", "sparsity_config")


def parse_pattern(pattern: str) -> tuple[float, int, int]:
    """``(sparsity, pruned n, m)`` of our pattern vocabulary: ``"0.7"`` -> (0.7, 0, 0), ``"2:4"`` -> (0.5, 2, 4).

    Ours says how many weights are *kept* in every m ("2:4": 2 kept of 4); llm-compressor's
    ``mask_structure`` says how many are *pruned* (SparseGPT's topk of the smallest ``prune_n``).
    """
    if ":" in pattern:
        kept, group = (int(part) for part in pattern.split(":"))
        if not 0 < kept < group:
            raise ValueError(f"pattern {pattern!r}: N:M needs 0 < N < M (N weights kept in every M)")
        return (group - kept) / group, group - kept, group
    sparsity = float(pattern)
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"pattern {pattern!r}: unstructured sparsity must be between 0 and 1")
    return sparsity, 0, 0


def modifier_arguments(method: str, pattern: str, variant: str = "none") -> tuple[str, str, dict[str, Any]]:
    """``(module, class name, keyword arguments)`` of the llm-compressor modifier for one run.

    Pure: it imports nothing from llmcompressor, so the mapping is testable without it.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r}: use one of {', '.join(METHODS)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: use one of {', '.join(VARIANTS)}")
    sparsity, pruned, group = parse_pattern(pattern)
    module, name = MODIFIER_CLASSES[method]
    if method == "magnitude":
        if pruned:
            raise ValueError("the magnitude check runs unstructured patterns only")
        if variant != "none":
            raise ValueError(f"variant {variant!r} applies to sparsegpt and wanda")
        # A one-step schedule at the target sparsity, on the decoder linears only (not the tied lm_head).
        return module, name, {"targets": [DECODER_LINEARS], "init_sparsity": sparsity, "final_sparsity": sparsity,
                              "start": 0, "end": 1, "update": 1}
    arguments: dict[str, Any] = {
        "sparsity": sparsity,
        "mask_structure": f"{pruned}:{group}",
        "targets": ["Linear"],
        # An exact "lm_head" never matches: the modifier names a target's linears "<target>.<child>", which
        # for the lm_head target itself is "lm_head." (trailing dot); a regex matches it.
        "ignore": ["re:.*lm_head"],
    }
    if variant == "owl":
        arguments.update(sparsity_profile="owl", owl_m=OWL_M, owl_lmbda=OWL_LAMBDA)
    elif variant == "ignore-exact-lm-head":
        arguments["ignore"] = ["lm_head"]
    return module, name, arguments


def tokens_sha256(tokens) -> str:
    """sha256 of the token ids as contiguous int64 bytes: the same hash as our ``tasks.data.sampling.tokens_sha256``
    (this worker runs in another environment and cannot import it)."""
    import torch

    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def calibration_loader(tokens):
    """One window per batch, in file order: a DataLoader over ``Dataset.from_dict`` with a sequential sampler."""
    import torch
    from datasets import Dataset
    from torch.utils.data import DataLoader, SequentialSampler

    dataset = Dataset.from_dict({"input_ids": tokens.tolist(),
                                 "attention_mask": torch.ones_like(tokens).tolist()}).with_format("torch")
    return DataLoader(dataset, batch_size=1, sampler=SequentialSampler(dataset),
                      collate_fn=lambda rows: {key: torch.stack([row[key] for row in rows]) for key in rows[0]})


def record_fed_windows(model, fed: list) -> Any:
    """Hook the input embedding to append every real (non-traced) batch of token ids the model is fed."""
    import torch

    def hook(_module, args):
        if args and type(args[0]) is torch.Tensor:
            fed.append(args[0].detach().to("cpu", torch.int64).clone())

    return model.get_input_embeddings().register_forward_pre_hook(hook)


def check_fed(fed: list, tokens) -> dict[str, Any]:
    """Whether the recorded batches are our windows in our order, pass after pass."""
    import torch

    rows = [row for batch in fed for row in batch.reshape(-1, batch.shape[-1])]
    count = tokens.shape[0]
    passes, extra = divmod(len(rows), count)
    in_order = bool(rows) and extra == 0 and all(
        row.shape == tokens[index % count].shape and torch.equal(row, tokens[index % count])
        for index, row in enumerate(rows)
    )
    return {"batches": len(fed), "windows_fed": len(rows), "passes": passes, "in_order": in_order}


def save_dense(model, source: Path, output: Path) -> list[str]:
    """Save ``model`` as a plain dense HF folder at ``output`` (via a temporary folder, then a rename).

    Uses transformers' own ``save_pretrained`` (llm-compressor wraps the instance's method to write its
    compressed format); returns the compression keys stripped from config.json, if any appeared.
    """
    from transformers import PreTrainedModel

    temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        PreTrainedModel.save_pretrained(model, temporary)
        config_path = temporary / "config.json"
        config = json.loads(config_path.read_text())
        stripped = [key for key in COMPRESSION_CONFIG_KEYS if key in config]
        if stripped:
            config = {k: v for k, v in config.items() if k not in stripped}
            config_path.write_text(json.dumps(config, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (source / name).is_file() and not (temporary / name).exists():
                shutil.copy2(source / name, temporary / name)
        if output.exists():
            shutil.rmtree(output)
        os.replace(temporary, output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return stripped


def versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name)
            for name in ("llmcompressor", "compressed-tensors", "torch", "transformers", "datasets")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="dense Hugging Face folder")
    parser.add_argument("--tokens", required=True, help="safetensors file with int64 input_ids (n, seqlen)")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--pattern", required=True, help="'0.7' (unstructured) or '2:4' (2 kept in every 4)")
    parser.add_argument("--variant", default="none", choices=VARIANTS)
    parser.add_argument("--output", required=True, help="folder for the pruned model")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--versions", action="store_true", help="print the versions as RESULT and exit")
    args = parser.parse_args()
    if args.versions:
        print(RESULT_PREFIX + json.dumps({"versions": versions()}), flush=True)
        return

    import torch
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    module, name, arguments = modifier_arguments(args.method, args.pattern, args.variant)
    modifier = getattr(importlib.import_module(module), name)(**arguments)
    tokens = load_file(args.tokens)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    fed: list = []
    hook = record_fed_windows(model, fed)
    started = time.perf_counter()
    oneshot(model=model, dataset=calibration_loader(tokens), recipe=modifier,
            num_calibration_samples=tokens.shape[0], max_seq_length=tokens.shape[1],
            shuffle_calibration_samples=False, batch_size=1)
    seconds = time.perf_counter() - started
    hook.remove()
    feeding = check_fed(fed, tokens)
    # A modifier without calibration data (magnitude) runs oneshot's data-free pipeline: nothing is fed.
    if (fed or modifier.requires_calibration_data) and not feeding["in_order"]:
        sys.exit(f"llm-compressor was not fed our calibration windows in our order: {feeding}")
    stripped = save_dense(model, Path(args.model), Path(args.output))
    print(RESULT_PREFIX + json.dumps({
        "method": args.method, "pattern": args.pattern, "variant": args.variant, "modifier": name,
        "modifier_arguments": arguments, "oneshot_seconds": seconds, "tokens_sha256": tokens_sha256(tokens),
        "feeding": feeding, "stripped_config_keys": stripped, "threads": torch.get_num_threads(),
        "versions": versions(),
    }), flush=True)


if __name__ == "__main__":
    main()
