"""The structured bench: its grid of structures, the goals it reads off the rows, the speed worker on tiny models."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.structured_bench import NEW_TOKENS, render_markdown, structures, time_models


def test_every_mlp_fraction_goes_alone_then_beside_each_head_fraction():
    assert structures([0.3, 0.1], [0.25]) == ["mlp:0.3", "mlp:0.3,heads:0.25", "mlp:0.1", "mlp:0.1,heads:0.25"]
    assert structures([0.5], []) == ["mlp:0.5"]


def _row(structure: str, method: str, wikitext2: float, c4: float) -> dict:
    return {"structure": structure, "method": method, "wikitext2_ppl": wikitext2, "c4_ppl": c4, "neurons": 1075,
            "heads": 9, "parameters": 80, "bytes": 320, "wall_seconds": 10.0}


def test_the_goal_is_alps_against_the_better_baseline_on_each_set():
    settings = {"model": "m", "calibration": "c4", "nsamples": 32, "seqlen": 512, "seed": 0, "ppl_windows": 4,
                "threads": 1, "structures": ["mlp:0.3"]}
    dense = {"neurons": 1536, "heads": 9, "parameters": 100, "bytes": 400, "wikitext2_ppl": 20.0, "c4_ppl": 20.0}
    # The better baseline differs by set: wanda-ls on WikiText-2 (50), magnitude on C4 (40).
    baselines = [_row("mlp:0.3", "wanda-ls", 50.0, 60.0), _row("mlp:0.3", "magnitude", 90.0, 40.0)]
    met = render_markdown({"settings": settings, "dense": dense, "speed": [],
                           "runs": [_row("mlp:0.3", "alps", 30.0, 28.0), *baselines]})
    assert "0.600 / 0.700 (met, <= 0.7)" in met
    assert "| 0.800 | 0.800 |" in met  # parameters and bytes as fractions of the dense model's
    missed = render_markdown({"settings": settings, "dense": dense, "speed": [],
                              "runs": [_row("mlp:0.3", "alps", 30.0, 30.0), *baselines]})
    assert "0.600 / 0.750 (missed, <= 0.7)" in missed


def test_the_speed_worker_times_both_models_on_full_length_generations(tmp_path):
    torch.manual_seed(0)
    shape = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 4096}
    for name, intermediate in (("dense", 64), ("pruned", 32)):
        LlamaForCausalLM(LlamaConfig(intermediate_size=intermediate, **shape)).save_pretrained(tmp_path / name)
    result = time_models(tmp_path / "dense", tmp_path / "pruned", repeats=2, seed=0)
    for name in ("dense", "pruned"):
        for kind in ("decode", "prefill"):
            assert len(result[f"{name}_{kind}_all_s"]) == 2 and result[f"{name}_{kind}_s"] > 0
    assert result["decode_speedup"] == result["dense_decode_s"] / result["pruned_decode_s"]
    assert result["pruned_decode_tokens_per_s"] == NEW_TOKENS / result["pruned_decode_s"]
