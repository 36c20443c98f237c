"""Calibration windows drawn from a data set's training text, as the SparseGPT/ALPS data utilities draw them.

A seeded ``random.Random``; for running text (wikitext2, ptb, pydoc) the split is joined and tokenized once
and each sample is a random window; for documents (c4) each sample is a random window of a random document
with at least ``seqlen + 1`` tokens. The hashes name exactly which text and which windows a run used.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ..common.errors import DataError, SettingError
from .loading import load_texts
from .registry import DATASETS, DatasetSpec, dataset_spec

__all__ = [
    "calibration_text_hash",
    "cap_seqlen",
    "calibration_windows",
    "check_calibration_size",
    "check_seqlen",
    "sample_document_windows",
    "sample_stream_windows",
    "tokenize_documents",
    "tokenize_text",
    "tokens_sha256",
]

logger = logging.getLogger(__name__)

_DOCUMENT_CHUNK = 512  # documents tokenized at a time while counting the windows a data set holds


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Token ids of a whole text as a 1-D LongTensor (no length warning: windows are cut afterwards)."""
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def tokenize_documents(tokenizer: PreTrainedTokenizerBase, documents: Sequence[str]) -> list[torch.Tensor]:
    """Token ids of each document as a 1-D LongTensor (one batched tokenizer call)."""
    return [torch.tensor(ids, dtype=torch.long) for ids in tokenizer(list(documents), verbose=False)["input_ids"]]


def check_seqlen(seqlen: int) -> int:
    """``seqlen`` itself if it can form a window (at least one input and one predicted token)."""
    if seqlen < 2:
        raise SettingError(
            "seqlen", seqlen, "a window needs at least 2 tokens (one input, one predicted)", "use e.g. --seqlen 2048"
        )
    return seqlen


def cap_seqlen(seqlen: int, limit: int | None) -> int:
    """``seqlen`` validated (at least 2) and capped at a model's maximum positions ``limit`` (if known)."""
    check_seqlen(seqlen)
    if limit and seqlen > limit:
        logger.warning("seqlen %d exceeds the model's max_position_embeddings %d: using %d", seqlen, limit, limit)
        return int(limit)
    return seqlen


def sample_stream_windows(tokens: torch.Tensor, count: int, seqlen: int, rng: random.Random) -> torch.Tensor:
    """``count`` random windows of ``seqlen`` tokens from one token stream, as a (count, seqlen) LongTensor.

    Same draws as SparseGPT's ``get_wikitext2``: start ``randint(0, len - seqlen - 1)``.
    """
    if tokens.numel() < seqlen + 1:
        raise SettingError(
            "seqlen", seqlen, f"the text has only {tokens.numel()} tokens, too few for one window", "lower --seqlen"
        )
    starts = [rng.randint(0, tokens.numel() - seqlen - 1) for _ in range(count)]
    return torch.stack([tokens[start : start + seqlen] for start in starts])


def sample_document_windows(
    documents: Sequence[torch.Tensor], count: int, seqlen: int, rng: random.Random
) -> torch.Tensor:
    """``count`` windows, each from a random document with at least ``seqlen + 1`` tokens: (count, seqlen).

    Same draws as the ALPS/GPTQ C4 loaders: redraw the document until it is long enough, then a random start.
    """
    if not any(document.numel() >= seqlen + 1 for document in documents):
        raise SettingError(
            "seqlen",
            seqlen,
            f"no document has {seqlen + 1} tokens (the longest has {max((d.numel() for d in documents), default=0)})",
            "lower --seqlen",
        )
    windows = []
    for _ in range(count):
        while True:
            document = documents[rng.randint(0, len(documents) - 1)]
            if document.numel() >= seqlen + 1:
                break
        start = rng.randint(0, document.numel() - seqlen - 1)
        windows.append(document[start : start + seqlen])
    return torch.stack(windows)


def calibration_windows(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> torch.Tensor:
    """``nsamples`` calibration windows of ``seqlen`` tokens from the training split: (nsamples, seqlen) long.

    Deterministic for a seed; never drawn from evaluation text.
    """
    if nsamples < 1:
        raise SettingError("nsamples", nsamples, "must be at least 1", "use e.g. --nsamples 128")
    check_seqlen(seqlen)
    spec, rows = _calibration_text(name, data_dir)
    rng = random.Random(seed)
    if spec.documents:
        documents = tokenize_documents(tokenizer, rows)
        _check_windows(spec, nsamples, seqlen, [document.numel() for document in documents])
        windows = sample_document_windows(documents, nsamples, seqlen, rng)
    else:
        tokens = tokenize_text(tokenizer, spec.joiner.join(rows))
        _check_windows(spec, nsamples, seqlen, [tokens.numel()])
        windows = sample_stream_windows(tokens, nsamples, seqlen, rng)
    logger.info(
        "Calibration: %d windows of %d tokens from %s/%s (seed %d)",
        nsamples,
        seqlen,
        name,
        spec.calibration_split,
        seed,
    )
    return windows


def check_calibration_size(
    name: str, tokenizer: PreTrainedTokenizerBase, *, nsamples: int, seqlen: int, data_dir: str | Path | None = None
) -> None:
    """Raise SettingError unless the training text of ``name`` holds ``nsamples`` windows of ``seqlen`` tokens
    that do not overlap: more would have the calibration repeat text. Documents are tokenized only until
    enough are found, so a large data set is not tokenized twice (``calibration_windows`` checks the same)."""
    spec, rows = _calibration_text(name, data_dir)
    if not spec.documents:
        _check_windows(spec, nsamples, seqlen, [tokenize_text(tokenizer, spec.joiner.join(rows)).numel()])
        return
    lengths: list[int] = []
    for start in range(0, len(rows), _DOCUMENT_CHUNK):
        lengths += [document.numel() for document in tokenize_documents(tokenizer, rows[start:start + _DOCUMENT_CHUNK])]
        if _window_count(lengths, seqlen) >= nsamples:
            return
    _check_windows(spec, nsamples, seqlen, lengths)


def _calibration_text(name: str, data_dir: str | Path | None) -> tuple[DatasetSpec, list[str]]:
    spec = dataset_spec(name)
    if spec.calibration_split is None:
        raise DataError(
            "calibration dataset",
            name,
            "has no training split to calibrate on",
            f"use one of {', '.join(n for n, s in DATASETS.items() if s.calibration_split)}",
        )
    return spec, load_texts(name, spec.calibration_split, data_dir)


def _window_count(lengths: Iterable[int], seqlen: int) -> int:
    """Windows of ``seqlen`` tokens, none overlapping, that texts of these token counts hold (as drawn, a
    window is followed by at least one more token of its text)."""
    return sum(max(length - 1, 0) // seqlen for length in lengths)


def _check_windows(spec: DatasetSpec, nsamples: int, seqlen: int, lengths: list[int]) -> None:
    """``nsamples`` windows of ``seqlen`` tokens fit, without overlapping, in texts of ``lengths`` tokens."""
    name, available = spec.name, _window_count(lengths, seqlen)
    if available == 0:  # not one window: the window is too long, whatever the count
        longest = max(lengths, default=0)
        problem = (f"no document has {seqlen + 1} tokens (the longest of {name}'s training split has {longest})"
                   if spec.documents else f"{name}'s training text has only {longest} tokens, too few for one window")
        raise SettingError("seqlen", seqlen, problem, f"lower --seqlen to {max(longest - 1, 2)} or less")
    if nsamples > available:
        raise SettingError(
            "nsamples", nsamples,
            f"{name}'s training text holds {available} windows of {seqlen} tokens ({sum(lengths):,} tokens), "
            f"fewer than the {nsamples} asked for: the windows would repeat text",
            f"use --nsamples {available} or fewer, a shorter --seqlen, or a larger data set (--calib)")


def tokens_sha256(tokens: torch.Tensor) -> str:
    """sha256 of token ids as contiguous int64 bytes: names the exact calibration windows a run used, so another
    tool's run can prove it calibrated on the same ones."""
    return hashlib.sha256(tokens.to(torch.int64).contiguous().cpu().numpy().tobytes()).hexdigest()


def calibration_text_hash(name: str, data_dir: str | Path | None = None) -> str:
    """sha256 of the training text ``calibration_windows`` draws from, wherever it comes from (data root,
    hub or the running Python's pydoc): what calibration caches key on, so other text never reuses them."""
    spec = dataset_spec(name)
    if spec.calibration_split is None:
        return "no-calibration-split"
    digest = hashlib.sha256()
    for row in load_texts(name, spec.calibration_split, data_dir):
        digest.update(row.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()
