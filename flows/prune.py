"""The pruning flow: model -> calibration inputs -> every decoder block -> saved, verified model."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.evaluate import evaluate_model
from tasks import tracking
from tasks.prune_config import PruneConfig
from tasks.pruning import (
    cached_in,
    capture_calibration,
    check_output_folder,
    check_pattern_fits,
    effective_seqlen,
    prepare_model,
    prune_blocks,
    prune_report,
    release_activations,
    run_keys,
    save_pruned_model,
    store_folder,
)
from tasks.remote import register_by_reference


def _run_name() -> str:
    from prefect.runtime import flow_run

    config = flow_run.parameters["config"]
    return tracking.prune_run_name(config if isinstance(config, dict) else config.model_dump())


@flow(name="prune-model", flow_run_name=_run_name, log_prints=False)
def prune_model(config: PruneConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Prune ``config.model`` block by block; every step is cached, so a rerun resumes where it stopped.
    One MLflow run (a child of ``parent_run_id`` if given) holds the settings, per-layer results, plots and
    the evaluation of the pruned model."""
    check_output_folder(config)
    settings = config.model_dump(mode="json")
    model = prepare_model(config.model)
    check_pattern_fits(model, config.sparsity_pattern)
    seqlen = effective_seqlen(model, config)
    keys, store = run_keys(model, config, seqlen), store_folder(config)

    def calibration(refresh: bool) -> dict[str, Any]:
        capture = cached_in(capture_calibration, store, refresh)
        return capture(key=keys["calibration"], model=model, calibration=config.calibration,
                       nsamples=config.nsamples, seqlen=seqlen, seed=config.seed,
                       data_dir=str(config.data_dir) if config.data_dir else None, device=config.device,
                       batch_size=config.batch_size, store=str(store), threads=config.threads)

    tags = {**tracking.prune_tags(settings), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    with tracking.tracked_run(None, tracking.prune_run_name(settings), tags, config.experiment) as run_id:
        captured, blocks = prune_blocks(model, calibration, config, keys, store)
        report = prune_report(model, config, seqlen, blocks, captured)
        output = save_pruned_model(model, blocks, config, report)
        if not config.keep_activations:
            release_activations([captured["inputs"]] + [block["outputs"] for block in blocks])
        result = {"output": output, "run_id": run_id,
                  **{k: report[k] for k in ("reused_blocks", "computed_blocks", "seconds")}}
        tracking.log_prune_run(settings, result, output, run_id=run_id, log_model=config.log_model)
        if config.evaluate:
            result["evaluation"] = evaluate_model(config.evaluation(output), run_id=run_id)
    return result


register_by_reference(globals())  # Dask/Ray workers import these tasks and flows (see tasks/remote.py)
