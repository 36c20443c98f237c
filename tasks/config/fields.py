"""Field checks more than one settings class shares: the device and the data sets a name may refer to."""

from __future__ import annotations

import re

from ..data.registry import DATASETS, DatasetKind

__all__ = ["calibration_dataset", "device", "text_datasets"]

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device(value: str) -> str:
    """``value`` if it names a device a run can use: auto, cpu, cuda or cuda:N (whether it is present is checked
    when the run starts, on the machine it runs on)."""
    if not _DEVICE.fullmatch(value):
        raise ValueError(f"{value!r} is not a device; use auto, cpu, cuda or cuda:N (N a GPU index, e.g. cuda:0)")
    return value


def calibration_dataset(name: str) -> str:
    """``name`` if it is a data set with a training split to calibrate on."""
    allowed = [key for key, spec in DATASETS.items() if spec.calibration_split]
    if name not in allowed:
        kind = "has no training split to calibrate on" if name in DATASETS else "is not a data set"
        raise ValueError(f"{name!r} {kind}; use one of {', '.join(allowed)}")
    return name


def text_datasets(names: list[str] | None) -> list[str] | None:
    """``names`` if each is a text data set (perplexity is measured on text, not on zero-shot tasks)."""
    allowed = [key for key, spec in DATASETS.items() if spec.kind is DatasetKind.TEXT]
    for name in names or ():
        if name not in allowed:
            kind = "is a zero-shot task, not a text data set" if name in DATASETS else "is not a data set"
            raise ValueError(f"{name!r} {kind}; use one of {', '.join(allowed)}")
    return names
