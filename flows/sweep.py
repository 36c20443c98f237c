"""The sweep flow: one model pruned with every (method, pattern), sharing one calibration capture."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from prefect import flow

from tasks.errors import SettingError
from tasks.pruning import store_folder
from tasks.sweep import (
    SweepFailed,
    activation_files,
    plan_sweep,
    release_new_activations,
    run_configuration,
    summarize_sweep,
)
from tasks.remote import register_by_reference

DEFAULT_SETTINGS = {"calibration": "pydoc", "nsamples": 16, "seqlen": 512, "threads": 1}


def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"sweep-{str(flow_run.parameters['model']).rstrip('/').split('/')[-1]}"


@flow(name="sweep-models", flow_run_name=_run_name, log_prints=False)
def sweep_models(
    model: str = "smollm2-135m",
    methods: tuple[str, ...] = ("alps", "sparsegpt", "wanda"),
    patterns: tuple[str, ...] = ("0.5", "0.7", "2:4"),
    settings: dict[str, Any] | None = None,
    output: Path = Path("out/sweep"),
    cache_dir: Path | None = None,
    evaluation: dict[str, Any] | None = None,
    concurrency: int = 1,
    track: bool = False,
) -> dict[str, Any]:
    """Prune ``model`` with every method at every pattern (each output in ``output/<method>-<pattern>``),
    then write a summary table artifact, ``sweep_summary.json`` and a plot of error against sparsity.

    ``settings`` holds the other PruneConfig fields (calibration, nsamples, seqlen, threads, ...);
    ``evaluation`` the EvaluateConfig fields (without ``model``) to evaluate every output with;
    ``concurrency`` > 1 runs configurations after the first that many at a time in the flow's thread pool;
    ``track`` logs a parent MLflow run with one child run per configuration.
    """
    if concurrency < 1:
        raise SettingError("concurrency", concurrency, "must be at least 1", "1 runs the configurations one by one")
    settings = DEFAULT_SETTINGS if settings is None else settings
    configs = plan_sweep(model, list(methods), list(patterns), settings, output, cache_dir)
    store = store_folder(configs[0])
    existing = activation_files(store)
    with _tracked_sweep(model, methods, patterns, settings) if track else nullcontext() as parent:
        # The first configuration runs alone: it captures the calibration inputs that all the others reuse.
        rows = [run_configuration(configs[0], evaluation, parent)]
        for start in range(1, len(configs), concurrency):
            wave = [run_configuration.submit(c, evaluation, parent) for c in configs[start:start + concurrency]]
            rows += [future.result() for future in wave]
        if not settings.get("keep_activations"):
            release_new_activations(store, existing)
        summary = summarize_sweep(model, rows, output)
        failed = [f"{r['method']} at {r['pattern']}: {r['error']}" for r in rows if r["status"] != "completed"]
        if failed:  # after the summary, so the finished configurations are reported
            raise SweepFailed(f"{len(failed)} of {len(rows)} configurations failed: " + "; ".join(failed))
    return summary


@contextmanager
def _tracked_sweep(model: str, methods, patterns, settings: dict[str, Any]) -> Iterator[str]:
    """The sweep's parent MLflow run (FINISHED, or FAILED if any configuration failed)."""
    from tasks import tracking

    with tracking.tracked_run(None, f"sweep-{Path(model).name}", {"model": model, "method": "sweep"}) as run_id:
        tracking.log_params(run_id, {"methods": list(methods), "patterns": list(patterns), **settings}, "sweep.")
        yield run_id


register_by_reference(globals())  # Dask/Ray workers import these tasks and flows (see tasks/remote.py)
