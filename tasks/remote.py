"""Make this project's Prefect tasks and flows travel to worker processes by reference.

Prefect's Dask and Ray task runners pickle the task they run and the serialized run context, which holds
the parent task and the flow. cloudpickle pickles a function by reference (``import module; module.name``)
only when ``module.<qualname>`` is that very function; under ``@task``/``@flow`` the module attribute is the
Task or Flow wrapper, so the function would be pickled by value with everything its globals reach, which
breaks on compiled types (safetensors' ``safe_open`` claims the module ``builtins``). Registering each
wrapped function under a private alias restores pickling by reference: workers import the module instead.
"""

from __future__ import annotations

from typing import Any

from prefect import Flow, Task

__all__ = ["register_by_reference"]


def register_by_reference(namespace: dict[str, Any]) -> None:
    """For every Task and Flow defined in the module whose ``globals()`` is ``namespace``, make its
    function importable under ``_<name>_function`` so that it pickles by reference."""
    module = namespace["__name__"]
    for name, value in list(namespace.items()):
        if isinstance(value, (Task, Flow)) and getattr(value.fn, "__module__", None) == module:
            alias = f"_{value.fn.__name__}_function"
            namespace[alias] = value.fn
            value.fn.__qualname__ = alias
