"""Perplexity with the protocol of the pruning papers (SparseGPT, Wanda, ALPS).

The evaluation text of a data set is tokenized once and cut into non-overlapping windows of ``seqlen``
tokens (a trailing partial window is dropped); each window is scored on its own (no context carried
over) and the perplexity is ``exp`` of the mean next-token negative log-likelihood over all scored tokens.

Evaluation text per data set:

- ``wikitext2``: the 4358 test rows joined with ``"\\n\\n"`` (as SparseGPT's ``get_wikitext2``).
- ``ptb``: the test sentences joined with ``" "`` (as SparseGPT's ``get_ptb``).
- ``c4``: 256 windows of ``seqlen`` tokens drawn with ``random.seed(0)`` from validation documents of at
  least ``seqlen + 1`` tokens (the ALPS/GPTQ C4 protocol). The papers draw from the first validation shard
  ``en/c4-validation.00000-of-00008``; the local data has a 2000-document validation sample instead, so
  local C4 numbers are real C4 text but not the papers' exact windows.
- ``pydoc``: the evaluation part of the pydoc topics joined with ``"\\n\\n"``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..common.errors import DataError, SettingError
from ..data.loading import load_texts
from ..data.registry import DatasetKind, dataset_spec
from ..data.sampling import cap_seqlen, sample_document_windows, tokenize_documents, tokenize_text

__all__ = [
    "C4_EVALUATION_SEED",
    "C4_EVALUATION_WINDOWS",
    "DEFAULT_SEQLEN",
    "PerplexityResult",
    "compute_perplexity",
    "effective_seqlen",
    "evaluate_perplexity",
    "evaluation_tokens",
]

logger = logging.getLogger(__name__)

DEFAULT_SEQLEN = 2048
C4_EVALUATION_WINDOWS = 256
C4_EVALUATION_SEED = 0
DEFAULT_LOG_EVERY = 10


@dataclass(frozen=True)
class PerplexityResult:
    """One perplexity measurement and how it was made."""

    dataset: str
    perplexity: float
    mean_nll: float
    seqlen: int
    windows: int  # windows scored
    available_windows: int  # full windows in the evaluation text (more than ``windows`` under max_windows)
    tokens_scored: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def effective_seqlen(model: PreTrainedModel, seqlen: int) -> int:
    """``seqlen`` validated (at least 2) and capped at the model's maximum position embeddings."""
    return cap_seqlen(seqlen, getattr(model.config, "max_position_embeddings", None))


def evaluation_tokens(
    dataset: str, tokenizer: PreTrainedTokenizerBase, seqlen: int, data_dir: str | Path | None = None
) -> torch.Tensor:
    """The evaluation token stream of a text data set (1-D LongTensor), following the papers' protocol."""
    spec = dataset_spec(dataset)
    if spec.kind is not DatasetKind.TEXT:
        raise DataError(
            "dataset", dataset, "a zero-shot task has no perplexity text", "use wikitext2, ptb, c4 or pydoc"
        )
    texts = load_texts(dataset, spec.evaluation_split, data_dir)
    if not spec.documents:
        return tokenize_text(tokenizer, spec.joiner.join(texts))
    documents = tokenize_documents(tokenizer, texts)
    windows = sample_document_windows(documents, C4_EVALUATION_WINDOWS, seqlen, random.Random(C4_EVALUATION_SEED))
    return windows.reshape(-1)


@torch.inference_mode()
def compute_perplexity(
    model: PreTrainedModel,
    tokens: torch.Tensor,
    *,
    seqlen: int = DEFAULT_SEQLEN,
    batch_size: int = 1,
    max_windows: int | None = None,
    label: str = "text",
    log_every: int = DEFAULT_LOG_EVERY,
) -> PerplexityResult:
    """Perplexity of ``model`` on a 1-D token stream cut into non-overlapping windows of ``seqlen``.

    ``batch_size`` windows go through the model at once (memory grows with batch_size * seqlen * vocab);
    ``max_windows`` scores only the first windows (a short slice); progress is logged every ``log_every``
    windows.
    """
    seqlen = effective_seqlen(model, seqlen)
    if batch_size < 1:
        raise SettingError("batch_size", batch_size, "must be at least 1", "use e.g. --batch-size 1")
    if max_windows is not None and max_windows < 1:
        raise SettingError("max_windows", max_windows, "must be at least 1 (or unset for all)", "omit --max-windows")
    available = tokens.numel() // seqlen
    if available == 0:
        raise SettingError(
            "seqlen",
            seqlen,
            f"the {label} text has only {tokens.numel()} tokens, fewer than one window",
            "lower --seqlen",
        )
    count = available if max_windows is None else min(max_windows, available)
    windows = tokens[: count * seqlen].reshape(count, seqlen)  # (count, seqlen)
    device = next(model.parameters()).device
    total_nll = 0.0
    started = time.perf_counter()
    next_log = log_every
    for first in range(0, count, batch_size):
        batch = windows[first : first + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits  # (batch, seqlen, vocab)
        # Token t predicts token t + 1: the last position has no target, the first token is never scored.
        total_nll += F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
        ).item()
        done = first + batch.shape[0]
        if done >= next_log or done == count:
            next_log = done + log_every
            logger.info(
                "%s: %d/%d windows, running perplexity %.3f, %.1f s",
                label,
                done,
                count,
                math.exp(total_nll / (done * (seqlen - 1))),
                time.perf_counter() - started,
            )
    scored = count * (seqlen - 1)
    mean_nll = total_nll / scored
    return PerplexityResult(
        dataset=label,
        perplexity=math.exp(mean_nll),
        mean_nll=mean_nll,
        seqlen=seqlen,
        windows=count,
        available_windows=available,
        tokens_scored=scored,
        seconds=time.perf_counter() - started,
    )


def evaluate_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: str,
    *,
    seqlen: int = DEFAULT_SEQLEN,
    batch_size: int = 1,
    max_windows: int | None = None,
    data_dir: str | Path | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on a named data set's evaluation text (see the module docstring)."""
    seqlen = effective_seqlen(model, seqlen)
    tokens = evaluation_tokens(dataset, tokenizer, seqlen, data_dir)
    return compute_perplexity(
        model, tokens, seqlen=seqlen, batch_size=batch_size, max_windows=max_windows, label=dataset
    )
