"""Building a settings object from user input, with pydantic's first complaint turned into a ``SettingError``
that names the field (as the user spelled it), the value, the problem and the fix; and checks made after it
reporting their fields the same way (``spelled_as``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from ..common.errors import AlpsError, SettingError

__all__ = ["spelled_as", "validated"]

M = TypeVar("M", bound=BaseModel)

# What to do about pydantic's commonest complaints ({field} is the name the user typed); other errors (the
# settings' own validators) say what is allowed in their message, and get the caller's fix.
_FIXES = {
    "greater_than_equal": "use {field} {ge} or more",
    "greater_than": "use {field} above {gt}",
    "int_parsing": "give {field} a whole number",
    "int_from_float": "give {field} a whole number",
    "int_type": "give {field} a whole number",
    "float_parsing": "give {field} a number",
    "literal_error": "use {field} {expected}",
    "string_too_short": "give {field} a non-empty value",
    "too_short": "give {field} at least {min_length} value(s)",
}


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
        raise SettingError(field, first.get("input"), message, _fix(first, field, fix)) from None


@contextmanager
def spelled_as(names: Mapping[str, str]) -> Iterator[None]:
    """Re-raise an AlpsError from the block with its field as the user typed it (``names`` as for
    ``validated``): checks after the settings are built name fields by their path too."""
    try:
        yield
    except AlpsError as error:
        raise error.renamed(names) from None


def _fix(error: ErrorDetails, field: str, fallback: str) -> str:
    template = _FIXES.get(error["type"])
    if template is None:
        return fallback
    return f"{template.format(field=field, **error.get('ctx', {}))}; {fallback}"
