"""Reading the splits of the named data sets: local files in their own formats, the hub, or pydoc.

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
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2  # huggingface_hub's transport: its network errors are not OSError subclasses

from ..common.errors import DataError, HubUnavailableError
from .registry import (
    DATA_DIR_ENV,
    DATASETS,
    PYDOC_SPLITS,
    DatasetKind,
    DatasetSpec,
    SplitSpec,
    dataset_spec,
    resolve_data_root,
)

__all__ = ["describe_datasets", "load_examples", "load_texts"]

logger = logging.getLogger(__name__)

PYDOC_EVALUATION_SHARE = 0.10


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
