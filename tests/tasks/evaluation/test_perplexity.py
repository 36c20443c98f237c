"""Perplexity: equal to a direct per-window computation, the papers' evaluation text, and bad settings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tasks.common.errors import SettingError
from tasks.data.loading import load_texts
from tasks.evaluation.perplexity import (
    C4_EVALUATION_WINDOWS,
    compute_perplexity,
    evaluate_perplexity,
    evaluation_tokens,
)


@torch.inference_mode()
def direct_perplexity(model, tokens: torch.Tensor, seqlen: int, windows: int) -> float:
    """exp of the mean of the per-window losses that transformers computes from labels."""
    slices = [tokens[None, i * seqlen : (i + 1) * seqlen] for i in range(windows)]
    losses = [model(input_ids=window, labels=window).loss for window in slices]
    return math.exp(torch.stack(losses).mean().item())


def test_bundled_model_on_a_slice_equals_direct_computation(smollm2, data_dir: Path) -> None:
    model, tokenizer = smollm2
    tokens = evaluation_tokens("wikitext2", tokenizer, 128, data_dir)
    result = compute_perplexity(model, tokens, seqlen=128, batch_size=2, max_windows=3)
    assert (result.windows, result.tokens_scored, result.seqlen) == (3, 3 * 127, 128)
    assert result.available_windows == tokens.numel() // 128
    assert result.perplexity == pytest.approx(direct_perplexity(model, tokens, 128, 3), rel=1e-5)
    # A real language model on English text: far below the uniform 49152-way guess.
    assert 2.0 < result.perplexity < 100.0


@pytest.mark.parametrize("builder", ["tiny_llama", "tiny_opt"])
def test_tiny_models_with_a_ragged_last_batch_equal_direct_computation(builder: str, request) -> None:
    model = request.getfixturevalue(builder)(num_layers=2)
    tokens = torch.randint(0, model.config.vocab_size, (5 * 32 + 7,), generator=torch.Generator().manual_seed(0))
    result = compute_perplexity(model, tokens, seqlen=32, batch_size=2)
    assert (result.windows, result.available_windows) == (5, 5)
    assert result.perplexity == pytest.approx(direct_perplexity(model, tokens, 32, 5), rel=1e-5)


def test_seqlen_is_capped_at_the_model_positions(tiny_llama) -> None:
    model = tiny_llama()
    tokens = torch.randint(0, model.config.vocab_size, (1024,), generator=torch.Generator().manual_seed(1))
    result = compute_perplexity(model, tokens, seqlen=512)
    assert (result.seqlen, result.windows) == (256, 4)


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"seqlen": 1}, "seqlen=1"),
        ({"seqlen": 0}, "seqlen=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"max_windows": 0}, "max_windows=0"),
        ({"seqlen": 200}, "seqlen=200"),  # 150 tokens: not one window
    ],
)
def test_bad_settings_name_the_field_and_the_fix(tiny_llama, settings: dict, field: str) -> None:
    tokens = torch.zeros(150, dtype=torch.long)
    with pytest.raises(SettingError, match=rf"^{field}: .*Fix: "):
        compute_perplexity(tiny_llama(), tokens, **{"seqlen": 32, **settings})


def test_ptb_text_is_the_sentences_joined_with_spaces(smollm2, data_dir: Path) -> None:
    _, tokenizer = smollm2
    tokens = evaluation_tokens("ptb", tokenizer, 2048, data_dir)
    sentences = load_texts("ptb", "test", data_dir)
    decoded = tokenizer.decode(tokens)
    assert decoded.startswith(f"{sentences[0]} {sentences[1]} ")
    assert decoded.endswith(f" {sentences[-1]}")


def test_c4_evaluation_is_256_seeded_windows_of_validation_documents(smollm2, data_dir: Path) -> None:
    _, tokenizer = smollm2
    tokens = evaluation_tokens("c4", tokenizer, 64, data_dir)
    assert tokens.shape == (C4_EVALUATION_WINDOWS * 64,)
    assert torch.equal(tokens, evaluation_tokens("c4", tokenizer, 64, data_dir))
    documents = load_texts("c4", "validation", data_dir)
    for window in tokens.reshape(-1, 64)[:8]:
        snippet = tokenizer.decode(window[4:-4])
        assert any(snippet in document for document in documents)


def test_pydoc_perplexity_of_the_bundled_model(smollm2) -> None:
    model, tokenizer = smollm2
    result = evaluate_perplexity(model, tokenizer, "pydoc", seqlen=256, max_windows=2)
    assert result.dataset == "pydoc" and result.windows == 2
    assert 2.0 < result.perplexity < 40.0
