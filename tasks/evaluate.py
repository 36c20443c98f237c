"""The Prefect tasks of the evaluation flow (``flows/evaluate.py``): thin wrappers over ``tasks.evaluation``.

The loaded model goes from task to task in memory, within the flow's process: these tasks are never cached or
persisted (even with PREFECT_RESULTS_PERSIST_BY_DEFAULT), so a model is never pickled.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from .blockwise.report import block_error_rows
from .config.evaluate import EvaluateConfig
from .evaluation.perplexity import PerplexityResult, evaluate_perplexity
from .evaluation.summary import EvaluationSummary
from .evaluation.zero_shot import ZeroShotResult, evaluate_zero_shot
from .model.loading import load_model
from .model.references import ResolvedModel, resolve_model
from .orchestration import run_logger, task

__all__ = ["load_for_evaluation", "measure_perplexity", "measure_zero_shot", "publish_block_errors",
           "publish_evaluation"]

logger = logging.getLogger(__name__)


@task(name="load-model-for-evaluation", cache_policy=NO_CACHE, persist_result=False)
def load_for_evaluation(config: EvaluateConfig) -> tuple[Any, Any, ResolvedModel]:
    """(model, tokenizer, the model's identity) for evaluation."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    resolved = resolve_model(config.model)
    model, tokenizer = load_model(resolved, dtype=config.dtype, device=config.device,
                                  trust_remote_code=config.trust_remote_code)
    return model, tokenizer, resolved


@task(name="perplexity", task_run_name="perplexity-{dataset}", cache_policy=NO_CACHE, persist_result=False)
def measure_perplexity(model: Any, tokenizer: Any, dataset: str, config: EvaluateConfig) -> PerplexityResult:
    result = evaluate_perplexity(model, tokenizer, dataset, seqlen=config.seqlen, batch_size=config.ppl_batch_size,
                                 max_windows=config.max_windows, data_dir=config.data_dir)
    run_logger(logger).info("%s perplexity %.3f (%d of %d windows, %.1f s)", dataset, result.perplexity,
                            result.windows, result.available_windows, result.seconds)
    return result


@task(name="lm-eval", cache_policy=NO_CACHE, persist_result=False)
def measure_zero_shot(model: Any, tokenizer: Any, config: EvaluateConfig) -> ZeroShotResult:
    result = evaluate_zero_shot(model, tokenizer, config.tasks, data_dir=config.data_dir, limit=config.limit,
                                batch_size=config.batch_size)
    run_logger(logger).info("lm-eval: %s (%.1f s)", ", ".join(f"{k} {v:.4f}" for k, v in result.accuracy.items()),
                            result.seconds)
    return result


@task(name="publish-evaluation", cache_policy=NO_CACHE)
def publish_evaluation(summary: EvaluationSummary, report: Mapping[str, Any] | None, mlflow_url: str | None) -> None:
    """Prefect artifacts: a markdown summary, the block errors of the prune report, a link to the MLflow run (when
    there is one: ``mlflow_url`` is None for a run MLflow does not hold)."""
    lines = [f"# Evaluation of `{summary.model}`", "", "| measure | value |", "| --- | --- |"]
    lines += [f"| perplexity {name} | {value:.3f} |" for name, value in summary.perplexity.items()]
    lines += [f"| accuracy {name} | {value:.4f} |" for name, value in summary.accuracy.items()]
    lines += [f"| seconds | {summary.seconds:.1f} |", "",
              f"MLflow run `{summary.run_id}`: {mlflow_url}" if mlflow_url else "Not tracked in MLflow."]
    if summary.limit is not None:
        lines.append(f"\nlm-eval tasks limited to {summary.limit} items each (not full-set numbers).")
    create_markdown_artifact("\n".join(lines), key="evaluation-summary", description="perplexity and accuracy")
    if report is not None:
        publish_block_errors(report)
    if mlflow_url:
        create_link_artifact(mlflow_url, link_text=f"MLflow run {summary.run_id}", key="mlflow-run")


def publish_block_errors(report: Mapping[str, Any]) -> None:
    """A Prefect table artifact from a prune report (as JSON): every block's mean and worst relative layer
    error and its time."""
    rows = [{"block": row["block"], "mean_rel_error": round(row["mean_rel_error"], 6),
             "max_rel_error": round(row["max_rel_error"], 6), "seconds": round(row["seconds"], 2)}
            for row in block_error_rows(report)]
    create_table_artifact(rows, key="block-errors", description="relative error per pruned block")
