"""Named data sets: where each split lives, loaders in the local file formats, and calibration sampling.

Every name resolves either to files under a data root (``--data-dir`` or ``$ALPS_DATA_DIR``, laid out like
``shared/data``: ``wikitext2/``, ``ptb/``, ``c4/``, ...) or, when no data root is configured, to the Hugging
Face hub data set the papers use (``datasets.load_dataset``; it needs the network). ``pydoc`` is CPython's
own documentation (``pydoc_data.topics``) and is present everywhere.

Perplexity / calibration text (``load_texts`` returns a list of strings, one per row or document):

- ``wikitext2``: rows of ``wikitext-2-raw-v1``. Locally they are rebuilt from the ``.raw`` files exactly as
  the hub rows are: a blank line is the row ``""``, any other line is ``line + "\\n"``. Calibration uses
  ``train`` (locally only its first 1018 lines, ``wiki.train.prefix-1018lines.raw``).
- ``ptb``: the sentences of ``ptb_text_only`` (stripped lines of Mikolov's files). The local data has no
  training split, so ptb calibration needs ``ptb/ptb.train.txt`` added to the data root, or the hub.
  It is never taken from the validation or test text.
- ``c4``: documents of ``allenai/c4`` ``en``. Evaluation uses ``validation`` (locally
  ``c4-validation-sample2000.jsonl``), calibration ``train`` (locally ``c4-train-long128.jsonl``).
- ``pydoc``: topics sorted by key; the last topics holding at least 10% of the characters are the
  evaluation part (``test``), all others the calibration part (``train``).

Zero-shot tasks (``load_examples`` returns a list of dicts in the local file format, which matches the
hub layout): ``lambada``, ``piqa``, ``arc_easy``, ``arc_challenge``, ``mmlu``, ``gsm8k``.

Calibration follows the SparseGPT/ALPS data utilities: a seeded ``random.Random``; for running text
(wikitext2, ptb, pydoc) the split is joined and tokenized once and each sample is a random window; for
documents (c4) each sample is a random window of a random document with at least ``seqlen + 1`` tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import httpx2  # huggingface_hub's transport: its network errors are not OSError subclasses
import torch
from transformers import PreTrainedTokenizerBase

from .errors import DataError, HubUnavailableError, SettingError

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "DatasetKind",
    "DatasetSpec",
    "SplitSpec",
    "calibration_text_hash",
    "calibration_windows",
    "check_seqlen",
    "dataset_spec",
    "describe_datasets",
    "load_examples",
    "load_texts",
    "resolve_data_root",
    "sample_document_windows",
    "sample_stream_windows",
    "tokenize_documents",
    "tokenize_text",
]

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "ALPS_DATA_DIR"
PYDOC_EVALUATION_SHARE = 0.10
PYDOC_SPLITS = ("train", "test")  # calibration part, evaluation part


class DatasetKind(str, Enum):
    TEXT = "text"  # perplexity evaluation and calibration
    ZERO_SHOT = "zero-shot"  # task examples for the evaluation harness


@dataclass(frozen=True)
class HubSource:
    """Arguments of ``datasets.load_dataset`` for one split."""

    path: str
    name: str | None = None
    split: str = "test"
    data_files: dict[str, str] | None = None

    def describe(self) -> str:
        config = f" ({self.name})" if self.name else ""
        files = f" {list(self.data_files.values())[0]}" if self.data_files else ""
        return f"hub {self.path}{config}{files} [{self.split}]"


@dataclass(frozen=True)
class SplitSpec:
    """One split: its file under the data root, its hub source, the column holding the text of a text
    data set's JSON rows (None: rows are dicts, or the file is plain text), and a hint when the file is not
    shipped with the shared data."""

    file: str
    hub: HubSource
    text_column: str | None = None
    missing_hint: str = ""


@dataclass(frozen=True)
class DatasetSpec:
    """A named data set: kind, its splits, which split is evaluated and which one calibrates."""

    name: str
    kind: DatasetKind
    description: str
    splits: dict[str, SplitSpec] = field(default_factory=dict)
    evaluation_split: str = "test"
    calibration_split: str | None = None
    joiner: str = "\n\n"  # how rows are joined into one running text (perplexity protocol)
    documents: bool = False  # sample windows per document (C4) instead of from the joined text


def _wikitext(split: str, file: str) -> SplitSpec:
    return SplitSpec(f"wikitext2/{file}", HubSource("wikitext", "wikitext-2-raw-v1", split), "text")


def _ptb(split: str, file: str, missing_hint: str = "") -> SplitSpec:
    return SplitSpec(f"ptb/{file}", HubSource("ptb_text_only", "penn_treebank", split), "sentence", missing_hint)


def _c4(split: str, file: str, shard: str) -> SplitSpec:
    return SplitSpec(f"c4/{file}", HubSource("allenai/c4", None, split, {split: shard}), "text")


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "wikitext2",
            DatasetKind.TEXT,
            "WikiText-2 raw (wikitext-2-raw-v1)",
            {
                "test": _wikitext("test", "wiki.test.raw"),
                "validation": _wikitext("validation", "wiki.valid.raw"),
                "train": _wikitext("train", "wiki.train.prefix-1018lines.raw"),
            },
            calibration_split="train",
        ),
        DatasetSpec(
            "ptb",
            DatasetKind.TEXT,
            "Penn Treebank, Mikolov's preprocessed text (ptb_text_only)",
            {
                "test": _ptb("test", "ptb.test.txt"),
                "validation": _ptb("validation", "ptb.valid.txt"),
                "train": _ptb(
                    "train",
                    "ptb.train.txt",
                    "the PTB training split is not part of the shared local data and ptb calibration needs it "
                    "(it is never taken from validation or test text)",
                ),
            },
            calibration_split="train",
            joiner=" ",
        ),
        DatasetSpec(
            "c4",
            DatasetKind.TEXT,
            "C4 en (allenai/c4)",
            {
                "validation": _c4(
                    "validation", "c4-validation-sample2000.jsonl", "en/c4-validation.00000-of-00008.json.gz"
                ),
                "train": _c4("train", "c4-train-long128.jsonl", "en/c4-train.00000-of-01024.json.gz"),
            },
            evaluation_split="validation",
            calibration_split="train",
            joiner=" ",
            documents=True,
        ),
        DatasetSpec(
            "pydoc", DatasetKind.TEXT, "CPython's pydoc topics (bundled with Python)", calibration_split="train"
        ),
        DatasetSpec(
            "lambada",
            DatasetKind.ZERO_SHOT,
            "LAMBADA, OpenAI version",
            {
                "test": SplitSpec(
                    "lambada/lambada_test.jsonl", HubSource("EleutherAI/lambada_openai", "default", "test")
                )
            },
        ),
        DatasetSpec(
            "piqa",
            DatasetKind.ZERO_SHOT,
            "PIQA",
            {"validation": SplitSpec("piqa/valid.jsonl", HubSource("baber/piqa", None, "validation"))},
            evaluation_split="validation",
        ),
        DatasetSpec(
            "arc_easy",
            DatasetKind.ZERO_SHOT,
            "ARC-Easy",
            {"test": SplitSpec("arc/ARC-Easy-Test.jsonl", HubSource("allenai/ai2_arc", "ARC-Easy", "test"))},
        ),
        DatasetSpec(
            "arc_challenge",
            DatasetKind.ZERO_SHOT,
            "ARC-Challenge",
            {"test": SplitSpec("arc/ARC-Challenge-Test.jsonl", HubSource("allenai/ai2_arc", "ARC-Challenge", "test"))},
        ),
        DatasetSpec(
            "mmlu",
            DatasetKind.ZERO_SHOT,
            "MMLU (57 subjects)",
            {
                "test": SplitSpec("mmlu/test.jsonl", HubSource("cais/mmlu", "all", "test")),
                "dev": SplitSpec("mmlu/dev.jsonl", HubSource("cais/mmlu", "all", "dev")),
            },
        ),
        DatasetSpec(
            "gsm8k",
            DatasetKind.ZERO_SHOT,
            "GSM8K",
            {"test": SplitSpec("gsm8k/test.jsonl", HubSource("openai/gsm8k", "main", "test"))},
        ),
    )
}


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of a named data set; an unknown name raises DataError listing the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError("dataset", name, "unknown data set", f"use one of {', '.join(DATASETS)}") from None


def resolve_data_root(data_dir: str | Path | None = None) -> Path | None:
    """The data root: ``data_dir`` if given, else ``$ALPS_DATA_DIR``, else None (load from the hub)."""
    if data_dir is not None:
        source, value = "--data-dir", str(data_dir)
    elif os.environ.get(DATA_DIR_ENV):
        source, value = DATA_DIR_ENV, os.environ[DATA_DIR_ENV]
    else:
        return None
    root = Path(value).expanduser()
    if not root.is_dir():
        raise DataError(
            source,
            value,
            f"the data root {root.resolve()} does not exist or is not a folder",
            "point it at a folder laid out like shared/data (wikitext2/, ptb/, c4/, ...), "
            f"or unset {DATA_DIR_ENV} and omit --data-dir to load from the Hugging Face hub",
        )
    return root


def load_texts(name: str, split: str | None = None, data_dir: str | Path | None = None) -> list[str]:
    """The rows (or documents) of a text data set's split, in the hub layout; default: its evaluation split."""
    spec = dataset_spec(name)
    if spec.kind is not DatasetKind.TEXT:
        raise DataError("dataset", name, "a zero-shot task, not a text data set", "use load_examples for it")
    split = split or spec.evaluation_split
    if name == "pydoc":
        return _pydoc_texts(split)
    return _load_split(spec, split, data_dir)


def load_examples(name: str, split: str | None = None, data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The examples of a zero-shot task as dicts in the local file format; default: its evaluation split."""
    spec = dataset_spec(name)
    if spec.kind is not DatasetKind.ZERO_SHOT:
        raise DataError("dataset", name, "a text data set, not a zero-shot task", "use load_texts for it")
    return _load_split(spec, split or spec.evaluation_split, data_dir)


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
    spec = dataset_spec(name)
    if spec.calibration_split is None:
        raise DataError(
            "calibration dataset",
            name,
            "has no training split to calibrate on",
            f"use one of {', '.join(n for n, s in DATASETS.items() if s.calibration_split)}",
        )
    rows = load_texts(name, spec.calibration_split, data_dir)
    rng = random.Random(seed)
    if spec.documents:
        windows = sample_document_windows(tokenize_documents(tokenizer, rows), nsamples, seqlen, rng)
    else:
        windows = sample_stream_windows(tokenize_text(tokenizer, spec.joiner.join(rows)), nsamples, seqlen, rng)
    logger.info(
        "Calibration: %d windows of %d tokens from %s/%s (seed %d)",
        nsamples,
        seqlen,
        name,
        spec.calibration_split,
        seed,
    )
    return windows


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


def describe_datasets(data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per data set and split: use, source, status (found, missing, hub, built-in) and item count.

    ``source`` is the file relative to the data root, the hub data set, or the Python module. Files under a
    data root are read and counted; hub sources are listed, never contacted.
    """
    root = resolve_data_root(data_dir)
    rows = []
    for spec in DATASETS.values():
        splits = PYDOC_SPLITS if spec.name == "pydoc" else tuple(spec.splits)
        for split in splits:
            row: dict[str, Any] = {"dataset": spec.name, "split": split, "use": _split_use(spec, split)}
            if spec.name == "pydoc":
                row.update(source="pydoc_data.topics", status="built-in", count=len(_pydoc_texts(split)))
            elif root is None:
                row.update(source=spec.splits[split].hub.describe(), status="hub", count=None)
            else:
                split_spec = spec.splits[split]
                path = root / split_spec.file
                found = path.is_file()
                row.update(
                    source=split_spec.file,
                    status="found" if found else "missing",
                    count=len(_read_local(split_spec, path)) if found else None,
                )
            rows.append(row)
    return rows


def _split_use(spec: DatasetSpec, split: str) -> str:
    if split == spec.calibration_split:
        return "calibration"
    if split == spec.evaluation_split:
        return "perplexity" if spec.kind is DatasetKind.TEXT else "zero-shot"
    return "extra"


def _load_split(spec: DatasetSpec, split: str, data_dir: str | Path | None) -> list[Any]:
    if split not in spec.splits:
        raise DataError(f"{spec.name} split", split, "no such split", f"use one of {', '.join(spec.splits)}")
    split_spec = spec.splits[split]
    root = resolve_data_root(data_dir)
    if root is None:
        return _load_from_hub(spec.name, split_spec)
    path = root / split_spec.file
    if not path.is_file():
        problem = f"not found under the data root {root.resolve()}"
        if split_spec.missing_hint:
            problem += f"; {split_spec.missing_hint}"
        raise DataError(
            f"{spec.name} {split} file",
            str(path),
            problem,
            f"put {split_spec.file} under the data root (layout of shared/data, see its SOURCES.md), "
            f"or unset {DATA_DIR_ENV} and omit --data-dir to load {split_spec.hub.describe()}",
        )
    return _read_local(split_spec, path)


def _read_local(split_spec: SplitSpec, path: Path) -> list[Any]:
    rows = _READERS[path.suffix](path)
    if split_spec.text_column and path.suffix == ".jsonl":
        return [row[split_spec.text_column] for row in rows]
    return rows


def _load_from_hub(name: str, split_spec: SplitSpec) -> list[Any]:
    hub = split_spec.hub
    # Imported here: `datasets` is slow to import and only needed when no data root is configured.
    from datasets import load_dataset

    logger.info("No data root configured: loading %s from the %s", name, hub.describe())
    try:
        dataset = load_dataset(hub.path, hub.name, split=hub.split, data_files=hub.data_files)
    except (OSError, httpx2.TransportError) as error:
        raise HubUnavailableError(
            "dataset",
            name,
            f"no data root is configured, so it comes from the {hub.describe()}, and that failed "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}); "
            "HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 or no network block the hub",
            f"set {DATA_DIR_ENV} or pass --data-dir pointing at local data laid out like shared/data",
        ) from error
    if split_spec.text_column:
        return list(dataset[split_spec.text_column])
    return [dict(row) for row in dataset]


def _read_wikitext_raw(path: Path) -> list[str]:
    # The hub rows of wikitext-2-raw-v1: a blank line (a single space in the .raw file) is "", any other
    # line keeps its text plus "\n". A blank unterminated remainder is not a line (the train prefix file
    # ends with the first byte of the next blank line).
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and not lines[-1].strip():
        lines.pop()
    return ["" if not line.strip() else line + "\n" for line in lines]


def _read_sentences(path: Path) -> list[str]:
    # ptb_text_only rows are the stripped lines of Mikolov's files.
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(
                    "data file", f"{path}:{number}", f"not valid JSON ({error.msg})", "restore the file from its source"
                ) from error
    return rows


_READERS: dict[str, Callable[[Path], list[Any]]] = {
    ".raw": _read_wikitext_raw,
    ".txt": _read_sentences,
    ".jsonl": _read_jsonl,
}


def _pydoc_texts(split: str) -> list[str]:
    from pydoc_data.topics import topics

    if split not in PYDOC_SPLITS:
        raise DataError("pydoc split", split, "no such split", "use train (calibration) or test (evaluation)")
    keys = sorted(topics)
    # The evaluation part is the shortest tail of the sorted keys holding PYDOC_EVALUATION_SHARE of the text.
    target = PYDOC_EVALUATION_SHARE * sum(len(topics[key]) for key in keys)
    boundary, tail = len(keys), 0
    while tail < target:
        boundary -= 1
        tail += len(topics[keys[boundary]])
    chosen = keys[boundary:] if split == "test" else keys[:boundary]
    return [topics[key] for key in chosen]
