"""How this project declares its Prefect tasks and flows, and reads its own cache.

``task`` and ``flow`` are Prefect's decorators, plus one thing: the decorated function stays importable by
reference. Prefect's Dask and Ray task runners pickle the task they run and the serialized run context, which
holds the parent task and the flow. cloudpickle pickles a function by reference (``import module;
module.name``) only when ``module.<qualname>`` is that very function; under ``@task``/``@flow`` the module
attribute is the Task or Flow wrapper, so the function would be pickled by value with everything its globals
reach, which breaks on compiled types (safetensors' ``safe_open`` claims the module ``builtins``). Each
function is therefore also registered under a private alias in its module, so workers import it instead.

Cached tasks keep their results and cache records in the run's cache folder (``cached_in``), beside the files
those results point at, so a cache folder is self-contained; ``cached_result`` reads such a record back
without running anything, which is how a run plans its resume.
"""

from __future__ import annotations

import logging
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import prefect
from prefect import Task, get_run_logger
from prefect.context import TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore

__all__ = ["cached_in", "cached_result", "flow", "key_parameter", "run_logger", "task"]

F = TypeVar("F", bound=Callable[..., Any])
RESULTS = "results"  # where a cache folder keeps Prefect's result records


def _importable_by_reference(function: Callable[..., Any]) -> None:
    module = sys.modules[function.__module__]
    alias = f"_{function.__name__}_function"
    setattr(module, alias, function)
    function.__qualname__ = alias


def _by_reference(decorator: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``decorator`` (``prefect.task`` or ``prefect.flow``) whose function stays importable by reference."""

    def declare(function: F | None = None, **options: Any) -> Any:
        def decorate(fn: F) -> Any:
            made = decorator(**options)(fn)
            _importable_by_reference(fn)
            return made

        return decorate(function) if function is not None else decorate

    declare.__doc__ = f"``prefect.{name}`` whose function pickles by reference (see the module docstring)."
    return declare


task = _by_reference(prefect.task, "task")
flow = _by_reference(prefect.flow, "flow")


def key_parameter(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """A ``cache_key_fn`` for tasks that are given their cache key as the parameter ``key``: the key chains
    the task's upstream identity (see ``tasks.blockwise.chain``), which INPUTS hashing could not see."""
    return parameters["key"]


def cached_in(task_: Task, cache_dir: Path, refresh: bool = False) -> Task:
    """``task_`` with its results and cache records kept under ``cache_dir``, recomputed if ``refresh``."""
    return task_.with_options(result_storage=Path(cache_dir) / RESULTS, refresh_cache=refresh or None)


def cached_result(cache_dir: Path, key: str, kind: type) -> Any | None:
    """The result a task cached under ``key`` in ``cache_dir``, or None when there is none of type ``kind``
    (a record that cannot be read, say from another pipeline version, is as good as none)."""
    store = ResultStore(result_storage=LocalFileSystem(basepath=str(Path(cache_dir) / RESULTS)))
    if not store.exists(key):
        return None
    try:
        value = store.read(key).result
    except (OSError, EOFError, ValueError, AttributeError, ImportError, pickle.UnpicklingError):
        return None
    return value if isinstance(value, kind) else None


def run_logger(fallback: logging.Logger | None = None) -> logging.Logger | logging.LoggerAdapter:
    """The current flow or task run's logger (shown in the Prefect UI and console), else ``fallback`` (or
    this package's logger)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return fallback or logging.getLogger("tasks")
