"""Errors a user can fix: every message names the field, the value, the problem and the fix.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["AlpsError", "DataError", "HubUnavailableError", "ModelReferenceError", "SettingError", "StorageError",
           "TrackingError"]


class AlpsError(Exception):
    """A problem with an input the user controls (a setting, a path, a reference)."""

    def __init__(self, field: str, value: Any, problem: str, fix: str) -> None:
        self.field = field
        self.value = value
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}={value!r}: {problem}. Fix: {fix}")

    def renamed(self, names: Mapping[str, str]) -> AlpsError:
        """The same error with its field as ``names`` spells it (``calibration.nsamples`` -> ``--nsamples``);
        a field ``names`` lacks keeps its name."""
        return type(self)(names.get(self.field, self.field), self.value, self.problem, self.fix)


class ModelReferenceError(AlpsError):
    """A model reference that names nothing loadable."""


class DataError(AlpsError):
    """A data set, data root or data file that cannot be found or read."""


class HubUnavailableError(AlpsError):
    """The Hugging Face hub was needed but cannot be reached (offline mode or no network)."""


class SettingError(AlpsError, ValueError):
    """A numeric or enumerated setting outside its allowed range."""


class StorageError(AlpsError):
    """A write that failed for lack of space or permission (a full disk, a read-only file system)."""


class TrackingError(AlpsError):
    """The MLflow store cannot record runs (unreachable, read-only), and tracking is required."""
