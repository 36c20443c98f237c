"""MLflow tracking: the one module that talks to MLflow, always through ``MlflowClient`` and an explicit run id.

MLflow's active run is thread-local (inside Prefect tasks run in a thread pool ``mlflow.active_run()`` is
None), so nothing here uses ``mlflow.start_run``: a run is created once per flow run and its id is passed on.

Store: ``$MLFLOW_TRACKING_URI`` when set (any MLflow URI), else a SQLite file and an artifact folder in
the working directory (``sqlite:///<cwd>/mlflow.db``, artifacts under ``<cwd>/mlruns``). A new experiment
in a SQLite store keeps its artifacts in ``mlruns/`` beside the database file.

What a run holds:

- parameters: the run's config flattened to dotted keys (``prune.solver.method``, ``prune.calibration.nsamples``,
  ``prune.solver_config.schedule.rho_init`` for the method's full config, ``eval.limit``);
- metrics with steps: ``layer/rel_error``, ``layer/rel_error_before_backsolve``, ``layer/sparsity``,
  ``layer/iterations`` (step = global layer index, blocks in order) and ``block/mean_rel_error``,
  ``block/seconds``, with block refinement ``block/refine_error_before`` and ``block/refine_error_after``, with
  a sparsity allocation ``block/allocated_sparsity`` and ``block/outlier_ratio`` (step = block index);
- final metrics: ``prune/mean_rel_error``, ``prune/seconds``, ``ppl/<dataset>``, ``acc/<task>``,
  ``<task>/<metric>`` (every lm-eval metric), ``eval/seconds``, ``eval/zero_shot_seconds``;
- artifacts: ``prune_report.json``, ``sparsity_manifest.json``, ``plots/layer_error.png``,
  ``plots/solver_history.png``, ``plots/layer_sparsity.png``, ``evaluation/lm_eval_results.json``,
  ``evaluation/ppl_<dataset>.json``, and the pruned model folder under ``model/`` (``log_model=True``) or only
  its path as the tag ``model_path``.

When the store cannot record runs. Tracking never stops the work a run does: every function here that talks to
the store goes through one guard (``_tracks``), which skips an untracked run (id None) and, when the store
raises (unreachable server, read-only database, full disk...), marks the run's tracking failed, warns once and
skips that run's later calls. What happened is ``tracking_problem(run_id)``, which the flows put in their
results. Before that, with tracking ``required``, ``check_store`` refuses a run before any work when the store
cannot take a write, and opening the run refuses likewise; with ``optional`` the run goes on untracked with one
warning. Both ask the store with short timeouts and no long retries (``PROBE_TIMEOUT_SECONDS``): MLflow's HTTP
client otherwise retries for minutes. A pruned folder keeps its full record (``prune_report.json``, and
``evaluation.json`` when it was evaluated): ``log_pruned_folder`` logs it later as a run (``alps track``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ..common.errors import DataError, TrackingError
from ..common.files import PRUNE_REPORT_FILE, SPARSITY_MANIFEST_FILE, remove_dead_temporaries, temporary_name
from ..common.locks import file_lock
from ..config.defaults import DEFAULT_EXPERIMENT, DEFAULT_TRACKING, TrackingMode
from ..evaluation.summary import EVALUATION_FILE
from .plots import layer_rows, plot_layer_errors, plot_layer_sparsity, plot_solver_history

__all__ = [
    "DEFAULT_EXPERIMENT",
    "PROBE_TIMEOUT_SECONDS",
    "check_store",
    "create_run",
    "end_run",
    "evaluation_tags",
    "flatten_params",
    "list_runs",
    "log_evaluation",
    "log_metrics",
    "log_params",
    "log_perplexity",
    "log_prune_report",
    "log_prune_run",
    "log_pruned_folder",
    "log_saved_evaluation",
    "prune_params",
    "prune_run_name",
    "prune_tags",
    "run_url",
    "tracked_run",
    "tracking_problem",
    "tracking_uri",
]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

UI_URL_ENV = "ALPS_MLFLOW_UI_URL"
DEFAULT_UI_URL = "http://127.0.0.1:5000"
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch call
# Asking the store whether it can record runs: one try of at most a few seconds per request (MLflow's HTTP client
# retries 7 times with exponential backoff by default, minutes against a server that is down). Calls during a run
# keep MLflow's retries: a blip is ridden out, and after one failure the run's later calls are skipped anyway.
PROBE_TIMEOUT_SECONDS = 5
PROBE_RETRIES = 0
STORE_CHECK_TAG = "alps.store_checked"  # the experiment tag check_store writes: a write any store must take


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def _client():
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    _create_sqlite_store(uri)
    return MlflowClient(uri)


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLite store URI, None for other stores. A SQLite URI may name its file as a URI
    of its own (``sqlite:///file:/path/mlflow.db?mode=ro&uri=true``)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").partition("?")[0].removeprefix("file:"))


def _create_sqlite_store(uri: str) -> None:
    """Create a SQLite store that does not exist yet whole: its tables are made in a temporary file, renamed
    into place once complete, under a lock beside it. MLflow creates them in place, so a run killed at that
    moment would leave a half-made database that every later run refuses ("table ... already exists")."""
    database = _sqlite_file(uri)
    if database is None or "mode=ro" in uri or not database.parent.is_dir() or _has_content(database):
        return  # an existing store, or one MLflow will refuse with its own error
    with file_lock(database.with_name(f".{database.name}.lock"), f"the new MLflow store {database}", logger):
        if _has_content(database):  # another run made it meanwhile
            return
        remove_dead_temporaries(database.parent, database.name)
        temporary = database.with_name(temporary_name(database) + "tmp")
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        try:
            store = SqlAlchemyStore(f"sqlite:///{temporary}", _artifact_location(uri))
            store.engine.dispose()
            os.replace(temporary, database)
        finally:
            temporary.unlink(missing_ok=True)


def _has_content(database: Path) -> bool:
    try:
        return database.stat().st_size > 0
    except FileNotFoundError:
        return False


def _experiment_id(client: Any, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=_artifact_location(tracking_uri()))


def _artifact_location(uri: str) -> str | None:
    """``mlruns/`` beside a SQLite store's file (MLflow's own default is ``./mlruns`` in whatever the working
    directory is); other stores keep their server's default."""
    database = _sqlite_file(uri)
    if database is None:
        return None
    return (database.parent.resolve() / "mlruns").as_uri()


# ------------------------------------------------------------------------------------------ store failures
class _RunTracking:
    """What became of one run's tracking in this process: whether it failed, and where its record is."""

    def __init__(self) -> None:
        self.failure: str | None = None  # the call that failed and why
        self.record: Path | None = None  # the pruned folder holding the run's full record


_runs: dict[str, _RunTracking] = {}
_runs_lock = threading.Lock()


def _run_tracking(run_id: str) -> _RunTracking:
    with _runs_lock:
        return _runs.setdefault(run_id, _RunTracking())


def _store_errors() -> tuple[type[BaseException], ...]:
    """What a store that cannot record raises: MLflow's own errors, the database's, the network's and the
    file system's (requests' errors are OSErrors)."""
    import sqlite3

    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return MlflowException, SQLAlchemyError, sqlite3.Error, OSError


# Words in a store error and what they mean to a user, first match wins.
_REASONS = (
    ("connection refused", "connection refused"),
    ("readonly database", "the database is read-only"),
    ("read-only file system", "the database is on a read-only file system"),
    ("unable to open database file", "the database file cannot be opened"),
    ("database is locked", "the database is locked by another process"),
    ("permission denied", "permission denied"),
    ("no space left", "no space left on the device"),
    (("table ", "already exists"), "the database was left half-made by a process killed while creating it: "
                                   "delete the file if it holds no runs yet"),
    ("timed out", f"no answer within {PROBE_TIMEOUT_SECONDS} s"),
    ("timeout", f"no answer within {PROBE_TIMEOUT_SECONDS} s"),
    ("name or service not known", "unknown host"),
    ("failed to resolve", "unknown host"),
)


def _reason(error: BaseException) -> str:
    """Why the store failed, in a few words (the error's own first line when no known words match)."""
    texts, seen = [], error
    while seen is not None and len(texts) < 5:  # MLflow wraps the database's or the network's error
        texts.append(str(seen).lower())
        seen = seen.__cause__ or seen.__context__
    for words, reason in _REASONS:  # words: one string, or several that must all be in one text
        if any(all(word in text for word in ((words,) if isinstance(words, str) else words)) for text in texts):
            return reason
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:200]}"


def _store_fix(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        store = "start the MLflow server, or point MLFLOW_TRACKING_URI at one that runs"
    elif uri.startswith("sqlite:"):
        store = "make the database file and its folder writable, or point MLFLOW_TRACKING_URI at a writable store"
    else:
        store = "fix MLFLOW_TRACKING_URI"
    return f"{store}; or pass --tracking optional to run without tracking"


def _unusable_store(error: BaseException) -> TrackingError:
    uri = tracking_uri()
    field = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking store"
    return TrackingError(field, uri, f"the MLflow store cannot record runs ({_reason(error)})", _store_fix(uri))


class _ReportedHere(logging.Filter):
    """Drops MLflow's own traceback of a database error raised in a call made here: the caller reports it, in
    one line (the probe as a TrackingError, a run's call as one warning)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_store_call, "active", False)


_store_call = threading.local()  # set while this thread is inside a call to the store made here


@contextmanager
def _reporting_store_errors() -> Iterator[None]:
    database_logger = logging.getLogger("mlflow.store.db.utils")  # logs every SQLAlchemy error with a traceback
    if not any(isinstance(existing, _ReportedHere) for existing in database_logger.filters):
        database_logger.addFilter(_ReportedHere())
    outer = getattr(_store_call, "active", False)
    _store_call.active = True
    try:
        yield
    finally:
        _store_call.active = outer


@contextmanager
def _quick_requests() -> Iterator[None]:
    """MLflow's HTTP requests give up within seconds (MLflow reads these variables at every request)."""
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    quick = {MLFLOW_HTTP_REQUEST_MAX_RETRIES.name: str(PROBE_RETRIES),
             MLFLOW_HTTP_REQUEST_TIMEOUT.name: str(PROBE_TIMEOUT_SECONDS),
             MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.name: "0"}
    before = {name: os.environ.get(name) for name in quick}
    os.environ.update(quick)
    try:
        with _reporting_store_errors():
            yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check_store(experiment: str = DEFAULT_EXPERIMENT, mode: TrackingMode = DEFAULT_TRACKING) -> None:
    """With tracking ``required``, raise TrackingError now, before any work, unless the store takes a write: the
    experiment is looked up (or created) and tagged with the time, within seconds. A check of the database
    file's permissions would not do: root writes anyway, and a server's store is out of reach. With ``optional``
    nothing is asked here: opening the run (``tracked_run``) warns once and the run goes on untracked."""
    if mode != "required":
        return
    try:
        with _quick_requests():
            client = _client()
            client.set_experiment_tag(_experiment_id(client, experiment), STORE_CHECK_TAG,
                                      time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    except _store_errors() as error:
        raise _unusable_store(error) from error


def _open_run(run_name: str, tags: Mapping[str, str] | None, experiment: str, mode: TrackingMode) -> str | None:
    """A new run's id (status RUNNING), asked for within seconds. When the store cannot record it: with tracking
    ``required`` a TrackingError, with ``optional`` one warning and None (the run goes on untracked)."""
    try:
        with _quick_requests():
            client = _client()
            run = client.create_run(_experiment_id(client, experiment), run_name=run_name, tags=dict(tags or {}))
    except _store_errors() as error:
        if mode == "required":
            raise _unusable_store(error) from error
        logger.warning("The MLflow store at %s cannot record runs (%s): run %r is NOT tracked (--tracking "
                       "optional). A pruned folder keeps its full record; log it later with `alps track <folder>`.",
                       tracking_uri(), _reason(error), run_name)
        return None
    _run_tracking(run.info.run_id)
    return run.info.run_id


def _tracks(log: F) -> F:
    """``log(run_id, ...)``, which talks to the store, made harmless to the run: skipped for an untracked run
    (None) or one whose tracking already failed; a store error marks the run's tracking failed (one warning)
    instead of raising, so nothing the run computes or saves depends on the store."""

    @functools.wraps(log)
    def guarded(run_id: str | None, *args: Any, **kwargs: Any) -> Any:
        if run_id is None or _run_tracking(run_id).failure is not None:
            return None
        try:
            with _reporting_store_errors():
                return log(run_id, *args, **kwargs)
        except _store_errors() as error:
            state = _run_tracking(run_id)
            with _runs_lock:
                first = state.failure is None
                state.failure = state.failure or f"{log.__name__.strip('_').replace('_', ' ')}: {_reason(error)}"
            if first:
                logger.warning("MLflow tracking of run %s failed (%s); the run goes on without tracking.",
                               run_id, state.failure)
            return None

    return guarded  # type: ignore[return-value]


def tracking_problem(run_id: str | None, record: str | Path | None = None) -> str | None:
    """None when run ``run_id`` is fully tracked; otherwise what went wrong and where the run's record is
    (``record``, or the pruned folder ``log_prune_run`` was given): what a flow's result and the command line
    report."""
    uri = tracking_uri()
    if run_id is None:
        problem = f"the run is not tracked in MLflow: the store at {uri} could not record runs when it started"
    else:
        state = _run_tracking(run_id)
        if state.failure is None:
            return None
        problem = (f"MLflow tracking failed during the run ({state.failure}); MLflow run {run_id} at {uri} is "
                   "incomplete")
        record = record or state.record
    if record is None:
        return problem + "."
    folder = Path(record).resolve()
    files = [name for name in (PRUNE_REPORT_FILE, EVALUATION_FILE) if (folder / name).is_file()]
    return (f"{problem}. The pruned model is saved and verified in {folder}, with its full record "
            f"({', '.join(files) or PRUNE_REPORT_FILE}): log it with `alps track {folder}` once the store works "
            "(or rerun the prune command with --overwrite: every cached block is reused).")


def create_run(run_name: str, tags: Mapping[str, str] | None = None, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Create a run (status RUNNING) and return its id; TrackingError when the store cannot record it."""
    run_id = _open_run(run_name, tags, experiment, "required")
    assert run_id is not None  # required: a failure raised
    return run_id


@_tracks
def end_run(run_id: str | None, status: str = "FINISHED") -> None:
    """Mark a run FINISHED, FAILED or KILLED; what was logged stays."""
    _client().set_terminated(run_id, status=status)


@_tracks
def set_tags(run_id: str | None, tags: Mapping[str, str]) -> None:
    client = _client()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


@contextmanager
def tracked_run(
    run_id: str | None, run_name: str, tags: Mapping[str, str] | None = None, experiment: str = DEFAULT_EXPERIMENT,
    mode: TrackingMode = DEFAULT_TRACKING,
) -> Iterator[str | None]:
    """Yield ``run_id``, or a new run's id. A run created here ends FINISHED, KILLED if the body is interrupted
    (KeyboardInterrupt, Prefect's TerminationSignal or any other BaseException that is not an Exception), or FAILED
    if it raises an Exception; what was logged stays. A run passed in belongs to its caller, who ends it (tags are
    still added). When the store cannot record a new run, ``mode`` decides: ``required`` raises TrackingError
    before the body, ``optional`` yields None (untracked; every logging function skips it)."""
    owned = run_id is None
    if owned:
        run_id = _open_run(run_name, tags, experiment, mode)
    else:
        set_tags(run_id, tags or {})
    try:
        yield run_id
    except BaseException as error:
        if owned:
            status = "FAILED" if isinstance(error, Exception) else "KILLED"
            try:
                end_run(run_id, status)  # a store that is down is ignored by the guard
            except Exception:  # marking the run must never hide why it ended
                logger.warning("could not mark MLflow run %s %s", run_id, status, exc_info=True)
        raise
    if owned:
        end_run(run_id, "FINISHED")


@_tracks
def run_url(run_id: str | None) -> str | None:
    """Where the run shows in ``mlflow ui`` (``$ALPS_MLFLOW_UI_URL``, default http://127.0.0.1:5000); None for an
    untracked run."""
    run = _client().get_run(run_id)
    base = os.environ.get(UI_URL_ENV, DEFAULT_UI_URL).rstrip("/")
    return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts flattened to dotted keys; values as strings (lists as JSON), cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
            continue
        text = json.dumps(value, default=str) if isinstance(value, (list, tuple, Mapping)) else str(value)
        flat[name] = text[:_MAX_PARAM_CHARS]
    return flat


@_tracks
def log_params(run_id: str | None, config: Mapping[str, Any], prefix: str = "") -> None:
    from mlflow.entities import Param

    params = [Param(key, value) for key, value in flatten_params(config, prefix).items()]
    client = _client()
    for first in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=params[first : first + 100])


def log_metrics(run_id: str | None, metrics: Mapping[str, float], step: int = 0) -> None:
    """Log finite metrics at one step (non-finite values, e.g. a diverged perplexity, are skipped)."""
    _log_metric_rows(run_id, [(name, value, step) for name, value in metrics.items()])


@_tracks
def _log_metric_rows(run_id: str | None, rows: list[tuple[str, float, int]]) -> None:
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    metrics = [Metric(name, float(value), stamp, step) for name, value, step in rows if math.isfinite(float(value))]
    client = _client()
    for first in range(0, len(metrics), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[first : first + _METRICS_PER_BATCH])


# ------------------------------------------------------------------------------------------ pruning
@_tracks
def log_prune_report(run_id: str | None, report: Mapping[str, Any]) -> None:
    """Per-layer and per-block metrics with steps, final pruning metrics, the report and its plots."""
    rows: list[tuple[str, float, int]] = []
    for layer in layer_rows(report):
        step = layer["index"]
        rows += [("layer/rel_error", layer["rel_error"], step), ("layer/sparsity", layer["achieved_sparsity"], step),
                 ("layer/iterations", layer["iterations"], step)]
        if layer.get("rel_error_before_backsolve") is not None:
            rows.append(("layer/rel_error_before_backsolve", layer["rel_error_before_backsolve"], step))
    for block in report["blocks"]:
        errors = [layer["rel_error"] for layer in block["layers"]]
        rows += [("block/mean_rel_error", sum(errors) / max(len(errors), 1), block["index"]),
                 ("block/seconds", block["seconds"], block["index"])]
        refinement = block.get("refinement")
        if refinement:  # the block's relative output error before and after block refinement
            rows.append(("block/refine_error_before", refinement["error_before"], block["index"]))
            if refinement.get("error_after") is not None:
                rows.append(("block/refine_error_after", refinement["error_after"], block["index"]))
    allocation = report.get("allocation")
    if allocation:  # how the sparsity was spread over the blocks (each layer's is layer/sparsity)
        rows += [("block/allocated_sparsity", value, index) for index, value in enumerate(allocation["block_sparsity"])]
        rows += [("block/outlier_ratio", value, index) for index, value in enumerate(allocation["outlier_ratios"])]
    rows += [("prune/mean_rel_error", report["mean_rel_error"], 0), ("prune/seconds", report["seconds"], 0)]
    if "sparsity" in report:
        rows.append(("prune/sparsity", report["sparsity"], 0))
    _log_metric_rows(run_id, rows)
    client = _client()
    client.log_dict(run_id, dict(report), PRUNE_REPORT_FILE)
    for name, plot in (("layer_error", plot_layer_errors), ("solver_history", plot_solver_history),
                       ("layer_sparsity", plot_layer_sparsity)):
        figure = plot(report)
        try:
            client.log_figure(run_id, figure, f"plots/{name}.png")
        finally:
            figure.clear()


def log_prune_run(report: Mapping[str, Any], output: str | Path, *, run_id: str | None,
                  log_model: bool = False) -> None:
    """Log a finished pruning run from its report (``PruneReport.to_json()``) into run ``run_id`` (nothing for an
    untracked run, None). ``output`` is the pruned folder, the run's record should tracking fail: with
    ``log_model`` it is copied into the run's artifacts (``model/``); otherwise only its path is recorded (tag
    ``model_path``) beside its sparsity manifest."""
    output = Path(output).resolve()
    if run_id is not None:
        _run_tracking(run_id).record = output
    config = report["config"]
    set_tags(run_id, prune_tags(config, output))
    log_params(run_id, prune_params(report), "prune.")
    log_metrics(run_id, {"prune/reused_blocks": len(report["reused_blocks"]),
                         "prune/computed_blocks": len(report["computed_blocks"]),
                         "prune/flow_seconds": float(report["seconds"])})
    log_prune_report(run_id, report)
    log_model_folder(run_id, output, log_model)


def log_pruned_folder(folder: str | Path, experiment: str | None = None) -> str:
    """Log a saved pruned folder's record as a new FINISHED run (``alps track``): its ``prune_report.json`` and,
    when present, its ``evaluation.json``; into ``experiment``, default the one the run was to be tracked in.
    Returns the run id; TrackingError when the store cannot record runs."""
    folder = Path(folder).expanduser().resolve()
    if not (folder / PRUNE_REPORT_FILE).is_file():
        raise DataError("folder", str(folder), f"holds no {PRUNE_REPORT_FILE}", "give a folder `alps prune` wrote")
    report = json.loads((folder / PRUNE_REPORT_FILE).read_text())
    config = report["config"]
    output = config.get("output") or {}
    experiment = experiment or output.get("experiment") or DEFAULT_EXPERIMENT
    tags = {**prune_tags(config, folder), "alps.logged_by": "alps track"}
    with tracked_run(None, prune_run_name(config), tags, experiment, "required") as run_id:
        log_prune_run(report, folder, run_id=run_id, log_model=bool(output.get("log_model", False)))
        if (folder / EVALUATION_FILE).is_file():
            log_saved_evaluation(run_id, json.loads((folder / EVALUATION_FILE).read_text()))
    return run_id


@_tracks
def log_saved_evaluation(run_id: str | None, evaluation: Mapping[str, Any]) -> None:
    """An ``evaluation.json`` (an EvaluationSummary) as metrics ``ppl/<dataset>``, ``acc/<task>``,
    ``eval/seconds``, the parameter ``eval.limit`` and the artifact ``evaluation/summary.json``."""
    log_metrics(run_id, {**{f"ppl/{name}": value for name, value in evaluation.get("perplexity", {}).items()},
                         **{f"acc/{task}": value for task, value in evaluation.get("accuracy", {}).items()},
                         **({"eval/seconds": evaluation["seconds"]} if "seconds" in evaluation else {})})
    log_params(run_id, {"limit": evaluation.get("limit")}, "eval.")
    _client().log_dict(run_id, dict(evaluation), "evaluation/summary.json")


def prune_params(report: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters a prune report records: its config, and the method's full config as ``solver_config``."""
    solver_config = report.get("solver_config")
    return {**report["config"], **({"solver_config": solver_config} if solver_config is not None else {})}


def _solver_settings(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Where a config dict keeps method and pattern: under ``solver`` (pipeline version 2 and later), or at
    its top (reports written by version 1)."""
    solver = config.get("solver")
    return solver if isinstance(solver, Mapping) else config


def prune_tags(config: Mapping[str, Any], output: Path | None = None) -> dict[str, str]:
    """Tags ``alps runs`` filters and shows on: model, method, pattern (a structure's text for structured pruning)
    (and model_path)."""
    solver = _solver_settings(config)
    tags = {"model": str(config.get("model", "")), "method": str(solver.get("method", "")),
            "pattern": str(solver.get("structured") or solver.get("pattern", ""))}
    if output is not None:
        tags["model_path"] = str(output)
    return tags


def evaluation_tags(model: str, report: Mapping[str, Any] | None) -> dict[str, str]:
    """Tags of an evaluation run: a pruned folder's are those of its pruning (base model, method, pattern)
    plus ``model_path``; a model without a prune report is ``dense``."""
    if report is None:
        return {"model": model, "method": "dense", "pattern": "dense"}
    return {**prune_tags(report["config"]), "model_path": str(Path(model).resolve())}


@_tracks
def log_model_folder(run_id: str | None, folder: str | Path, log_model: bool) -> None:
    """Copy the model folder into the run (``model/``) or record only where it is (a hub id as it is)."""
    client = _client()
    if not Path(folder).is_dir():
        client.set_tag(run_id, "model_path", str(folder))
        return
    client.set_tag(run_id, "model_path", str(Path(folder).resolve()))
    if log_model:
        client.log_artifacts(run_id, str(folder), "model")
    elif (Path(folder) / SPARSITY_MANIFEST_FILE).is_file():
        client.log_artifact(run_id, str(Path(folder) / SPARSITY_MANIFEST_FILE))


def prune_run_name(config: Mapping[str, Any]) -> str:
    tags = prune_tags(config)
    model = (tags["model"] or "model").rstrip("/").split("/")[-1]
    return f"prune-{model}-{tags['method']}-{tags['pattern']}"


# ------------------------------------------------------------------------------------------ evaluation
@_tracks
def log_perplexity(run_id: str | None, result: Mapping[str, Any]) -> None:
    """One PerplexityResult dict: the metric ``ppl/<dataset>`` and ``evaluation/ppl_<dataset>.json``."""
    log_metrics(run_id, {f"ppl/{result['dataset']}": result["perplexity"],
                         f"ppl_seconds/{result['dataset']}": result["seconds"]})
    _client().log_dict(run_id, dict(result), f"evaluation/ppl_{result['dataset']}.json")


@_tracks
def log_evaluation(run_id: str | None, zero_shot: Mapping[str, Any] | None = None,
                   seconds: float | None = None) -> None:
    """Final metrics of an evaluation: with a ZeroShotResult dict, ``acc/<task>``, ``<task>/<metric>`` and
    lm-eval's results as a JSON artifact; the evaluation's total ``eval/seconds``."""
    client = _client()
    if seconds is not None:
        log_metrics(run_id, {"eval/seconds": seconds})
    if zero_shot:
        metrics = {f"acc/{task}": value for task, value in zero_shot["accuracy"].items()}
        for task, values in zero_shot["metrics"].items():
            metrics.update({f"{task}/{name}": value for name, value in values.items()})
        metrics["eval/zero_shot_seconds"] = zero_shot["seconds"]
        log_metrics(run_id, metrics)
        client.log_text(run_id, json.dumps(zero_shot["lm_eval"], indent=2, default=str),
                        "evaluation/lm_eval_results.json")


# ------------------------------------------------------------------------------------------ listing
RUN_COLUMNS = ("model", "method", "pattern")


def list_runs(model: str | None = None, method: str | None = None,
              experiment: str = DEFAULT_EXPERIMENT) -> list[dict[str, Any]]:
    """Tracked runs, newest first: id, name, status, model/method/pattern tags, the lm-eval limit and every
    metric's latest value."""
    client = _client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    filters = [f"tags.{key} = '{value}'" for key, value in (("model", model), ("method", method)) if value]
    runs = client.search_runs([found.experiment_id], " and ".join(filters), order_by=["attributes.start_time DESC"])
    return [
        {
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "status": run.info.status,
            **{key: run.data.tags.get(key, "") for key in RUN_COLUMNS},
            "limit": run.data.params.get("eval.limit", ""),  # lm-eval items per task ("None": all)
            "metrics": dict(run.data.metrics),
        }
        for run in runs
    ]

