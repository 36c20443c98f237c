"""Building a settings object from user input, with pydantic's first complaint turned into a ``SettingError``
that names the field (as the user spelled it), the value, the problem and the fix."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ..common.errors import SettingError

__all__ = ["validated"]

M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], data: Mapping[str, Any], *, names: Mapping[str, str] | None = None,
              fix: str = "see --help") -> M:
    """``model`` built from ``data``; a bad field raises SettingError. ``names`` maps a dotted field path
    (``calibration.nsamples``) to the name the user typed (``--nsamples``)."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as error:
        first = error.errors()[0]
        parts = [str(part) for part in first["loc"]]
        path = ".".join(parts) or "settings"
        # The name of the field, or of the nearest enclosing one the user typed (patterns.0 -> --patterns).
        prefixes = (".".join(parts[:end]) for end in range(len(parts), 0, -1))
        field = next((names[p] for p in prefixes if p in (names or {})), path)
        message = first["msg"].removeprefix("Value error, ").rstrip(".")
        raise SettingError(field, first.get("input"), message, fix) from None
