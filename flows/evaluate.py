"""The evaluation flow: model -> perplexity per data set -> lm-eval tasks -> MLflow run and Prefect artifacts."""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import flow

from tasks import tracking
from tasks.evaluation import (
    EvaluateConfig,
    load_for_evaluation,
    measure_perplexity,
    measure_zero_shot,
    publish_evaluation,
)
from tasks.remote import register_by_reference


@flow(name="evaluate-model", flow_run_name="evaluate-{config.model}", log_prints=False)
def evaluate_model(config: EvaluateConfig, run_id: str | None = None) -> dict[str, Any]:
    """Perplexity and accuracy of ``config.model``, logged as they come into MLflow run ``run_id`` (the
    caller's: the caller ends it) or into a new run (FINISHED, or FAILED keeping what was logged)."""
    started = time.perf_counter()
    report_path = config.report_path()
    report = json.loads(report_path.read_text()) if report_path else None
    tags = tracking.evaluation_tags(config.model, report)
    with tracking.tracked_run(run_id, f"evaluate-{config.model}", tags, config.experiment) as run:
        tracking.log_params(run, config.model_dump(mode="json"), "eval.")
        if report is not None and run_id is None:  # a caller's run already holds its prune report
            tracking.log_params(run, report["config"], "prune.")
            tracking.log_prune_report(run, report)
        model, tokenizer, identity = load_for_evaluation(config)
        tracking.log_params(run, {"fingerprint": identity["fingerprint"]}, "model.")
        perplexity = {}
        for name in config.perplexity:
            result = measure_perplexity(model, tokenizer, name, config)
            tracking.log_perplexity(run, result)
            perplexity[name] = result["perplexity"]
        zero_shot = measure_zero_shot(model, tokenizer, config) if config.tasks else None
        seconds = time.perf_counter() - started
        tracking.log_evaluation(run, zero_shot, seconds)
        if config.log_model or run_id is None:
            tracking.log_model_folder(run, identity["location"], config.log_model)
        summary = {"run_id": run, "model": config.model, "perplexity": perplexity,
                   "accuracy": zero_shot["accuracy"] if zero_shot else {}, "limit": config.limit, "seconds": seconds}
        publish_evaluation(summary, report, tracking.run_url(run))
    return summary


register_by_reference(globals())  # Dask/Ray workers import these tasks and flows (see tasks/remote.py)
