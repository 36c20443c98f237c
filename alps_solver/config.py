"""Helpers shared by the solver configs: field validation and conversion from plain dicts.

Every method's config is a frozen, keyword-only dataclass validated in ``__post_init__`` with a
``version`` field; these helpers keep the error messages uniform (field, value, what is allowed).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

import torch

__all__ = [
    "COMPUTE_DTYPES", "require", "require_version", "require_compute_dtype", "config_from_dict",
]

COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}

C = TypeVar("C")


def require(condition: bool, field: str, value: Any, allowed: str) -> None:
    """Raise ValueError naming the field, its value and what is allowed, unless ``condition`` holds."""
    if not condition:
        raise ValueError(f"{field}={value!r} is invalid: {allowed}.")


def require_version(version: int) -> None:
    require(version == 1, "version", version, "this solver implements config version 1")


def require_compute_dtype(name: str) -> None:
    require(name in COMPUTE_DTYPES, "compute_dtype", name, f"must be one of {sorted(COMPUTE_DTYPES)}")


def config_from_dict(cls: type[C], data: dict[str, Any] | C | None) -> C:
    """Build ``cls`` from a (possibly nested) dict; unknown keys raise ValueError naming them."""
    if data is None:
        return cls()
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"config for {cls.__name__} must be a mapping or {cls.__name__}; got {type(data).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(fields)}.")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        kind = hints.get(name)
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = config_from_dict(kind, value)
        values[name] = value
    return cls(**values)
