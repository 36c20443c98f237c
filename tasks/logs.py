"""Logging for task code: the Prefect run logger inside a run, the module's own logger outside one."""

from __future__ import annotations

import logging

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

__all__ = ["run_logger"]


def run_logger(fallback: logging.Logger) -> logging.Logger | logging.LoggerAdapter:
    """The current flow or task run's logger (shown in the Prefect UI and console), else ``fallback``."""
    try:
        return get_run_logger()
    except MissingContextError:
        return fallback
