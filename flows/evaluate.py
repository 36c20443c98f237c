"""The evaluation flow: model -> perplexity per data set -> lm-eval tasks -> MLflow run and Prefect artifacts."""

from __future__ import annotations

import json
import time

from tasks.config.evaluate import EvaluateConfig
from tasks.evaluate import load_for_evaluation, measure_perplexity, measure_zero_shot, publish_evaluation
from tasks.evaluation.summary import EvaluationSummary
from tasks.orchestration import flow
from tasks.tracking import runs as tracking


@flow(name="evaluate-model", flow_run_name="evaluate-{config.model}", log_prints=False)
def evaluate_model(config: EvaluateConfig = EvaluateConfig(), run_id: str | None = None) -> EvaluationSummary:
    """Perplexity and accuracy of ``config.model``, logged as they come into MLflow run ``run_id`` (the
    caller's, which already holds the prune report: the caller ends it) or into a new run (FINISHED, or FAILED
    keeping what was logged). A store that fails midway stops only the logging (``summary.tracking_problem``)."""
    started = time.perf_counter()
    if run_id is None:
        tracking.check_store(config.experiment, config.tracking)  # required: stops now unless MLflow records
    report_path = config.report_path() if run_id is None else None
    report = json.loads(report_path.read_text()) if report_path else None
    tags = tracking.evaluation_tags(config.model, report) if run_id is None else {}
    with tracking.tracked_run(run_id, f"evaluate-{config.model}", tags, config.experiment, config.tracking) as run:
        tracking.log_params(run, config.model_dump(mode="json"), "eval.")
        if report is not None:
            tracking.log_params(run, tracking.prune_params(report), "prune.")
            tracking.log_prune_report(run, report)
        model, tokenizer, identity = load_for_evaluation(config)
        tracking.log_params(run, {"fingerprint": identity.fingerprint}, "model.")
        perplexity = {}
        for name in config.perplexity:
            result = measure_perplexity(model, tokenizer, name, config)
            tracking.log_perplexity(run, result.to_dict())
            perplexity[name] = result.perplexity
        zero_shot = measure_zero_shot(model, tokenizer, config) if config.tasks else None
        seconds = time.perf_counter() - started
        tracking.log_evaluation(run, zero_shot.to_dict() if zero_shot else None, seconds)
        if config.log_model or run_id is None:
            tracking.log_model_folder(run, identity.location, config.log_model)
        summary = EvaluationSummary(run_id=run, model=config.model, perplexity=perplexity,
                                    accuracy=zero_shot.accuracy if zero_shot else {}, limit=config.limit,
                                    seconds=seconds)
        publish_evaluation(summary, report, tracking.run_url(run))
    return summary.model_copy(update={"tracking_problem": tracking.tracking_problem(run)})  # once the run ended
