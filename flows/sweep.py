"""The sweep flow: one model pruned with every (method, pattern), sharing one calibration capture."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.prune import prune_model
from tasks.config.prune import PruneConfig
from tasks.config.sweep import SweepConfig
from tasks.orchestration import flow, run_logger, task
from tasks.sweep import SweepFailed, activation_files, release_new_activations, summarize_sweep
from tasks.tracking import runs as tracking
from tasks.tracking.sweeps import ConfigurationRow, SweepSummary, configuration_row


def _run_name() -> str:
    config = flow_run.parameters.get("config")
    model = config.get("model") if isinstance(config, dict) else getattr(config, "model", None)
    return f"sweep-{str(model or SweepConfig().model).rstrip('/').split('/')[-1]}"


@flow(name="sweep-models", flow_run_name=_run_name, log_prints=False)
def sweep_models(config: SweepConfig = SweepConfig()) -> SweepSummary:
    """Prune ``config.model`` with every method at every pattern (each output in ``output/<method>-<pattern>``),
    then write a summary table artifact, ``sweep_summary.json`` and a plot of error against sparsity. A failed
    configuration is a row of the summary; the sweep then fails after writing it. A configuration whose tracking
    failed midway is a completed row with its ``tracking_problem``."""
    tracking.check_store(config.experiment, config.tracking)  # required: stops now unless MLflow records
    configs = config.plan()
    cache_dir = configs[0].runtime.resolved_cache_dir()
    existing = activation_files(cache_dir)
    with _tracked_sweep(config) if config.track else nullcontext() as parent:
        # The first configuration runs alone: it captures the calibration inputs that all the others reuse.
        rows = [prune_configuration(configs[0], parent)]
        for start in range(1, len(configs), config.concurrency):
            wave = [prune_configuration.submit(c, parent) for c in configs[start:start + config.concurrency]]
            rows += [future.result() for future in wave]
        if not config.runtime.keep_activations:
            release_new_activations(cache_dir, existing)
        summary = summarize_sweep(config.model, rows, config.output)
        if summary.failed:  # after the summary, so the finished configurations are reported
            raise SweepFailed(f"{len(summary.failed)} of {len(rows)} configurations failed: "
                              + "; ".join(f"{r.method} at {r.pattern}: {r.error}" for r in summary.failed))
    return summary


@task(name="run-configuration", task_run_name="configuration-{config.solver.method}-{config.solver.pattern}",
      cache_policy=NO_CACHE)
def prune_configuration(config: PruneConfig, parent_run: str | None = None) -> ConfigurationRow:
    """One configuration as a subflow of the sweep (its MLflow run a child of ``parent_run``); a failed
    configuration is a row with status ``failed`` and its error, not an exception."""
    state = prune_model(config, parent_run_id=parent_run, return_state=True)
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, BaseException):
        run_logger().error("%s at %s failed: %s", config.solver.method, config.solver.pattern, outcome)
    return configuration_row(config, str(state.state_details.flow_run_id), outcome)


@contextmanager
def _tracked_sweep(config: SweepConfig) -> Iterator[str | None]:
    """The sweep's parent MLflow run (FINISHED, or FAILED if any configuration failed; None if untracked)."""
    with tracking.tracked_run(None, f"sweep-{Path(config.model).name}", {"model": config.model, "method": "sweep"},
                              config.experiment, config.tracking) as run_id:
        tracking.log_params(run_id, config.model_dump(mode="json"), "sweep.")
        yield run_id
