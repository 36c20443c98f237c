"""Named data sets: what each one is, where each split lives (a file under the data root, or a hub data set).

Every name resolves either to files under a data root (``--data-dir`` or ``$ALPS_DATA_DIR``, laid out like
``shared/data``: ``wikitext2/``, ``ptb/``, ``c4/``, ...) or, when no data root is configured, to the Hugging
Face hub data set the papers use (``datasets.load_dataset``; it needs the network). ``pydoc`` is CPython's
own documentation (``pydoc_data.topics``) and is present everywhere. Reading the splits is
``tasks.data.loading``; drawing calibration windows is ``tasks.data.sampling``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from ..common.errors import DataError

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "PYDOC_SPLITS",
    "DatasetKind",
    "DatasetSpec",
    "HubSource",
    "SplitSpec",
    "dataset_spec",
    "resolve_data_root",
]

DATA_DIR_ENV = "ALPS_DATA_DIR"
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
