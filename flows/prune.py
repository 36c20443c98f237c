"""The pruning flow: model -> calibration inputs -> every decoder block, in order -> saved, verified model."""

from __future__ import annotations

from prefect.runtime import flow_run

from flows.evaluate import evaluate_model
from tasks.blockwise.preflight import check_pattern_fits, claim_output_folder
from tasks.blockwise.report import PruneResult, build_report
from tasks.config.prune import PruneConfig
from tasks.evaluate import publish_block_errors
from tasks.evaluation.summary import save_evaluation
from tasks.orchestration import flow
from tasks.prune import (
    BlockProgress,
    allocate,
    calibrate,
    check_resources,
    plan_run,
    prepare_model,
    release_activations,
    release_superseded,
    save_pruned_model,
    solve_block_link,
)
from tasks.tracking import runs as tracking


def _run_name() -> str:
    config = flow_run.parameters.get("config") or PruneConfig()
    return tracking.prune_run_name(config if isinstance(config, dict) else config.model_dump(mode="json"))


@flow(name="prune-model", flow_run_name=_run_name, log_prints=False)
def prune_model(config: PruneConfig = PruneConfig(), parent_run_id: str | None = None) -> PruneResult:
    """Prune ``config.model`` block by block; every step is cached, so a rerun resumes where it stopped.
    One MLflow run (a child of ``parent_run_id`` if given) holds the settings, per-layer results, plots and
    the evaluation of the pruned model; the pruned folder holds them too (``prune_report.json``,
    ``evaluation.json``), so a store that fails midway costs the run nothing but its MLflow record.
    One run at a time writes an output folder: a second is refused."""
    tracking.check_store(config.output.experiment, config.output.tracking)  # required: stops now unless MLflow records
    with claim_output_folder(config.output, config):  # checked under the claim: a run that finished meanwhile is seen
        return _prune(config, parent_run_id)


def _prune(config: PruneConfig, parent_run_id: str | None) -> PruneResult:
    model = prepare_model(config.model)
    check_pattern_fits(model, config.solver)  # or, structured, its neurons and heads
    chain = plan_run(model, config)  # which cached blocks are reused, which are solved or replayed
    check_resources(model, config, chain)  # disk, RAM and device memory: a run that cannot fit stops now
    settings = config.model_dump(mode="json")
    tags = {**tracking.prune_tags(settings), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    with tracking.tracked_run(None, tracking.prune_run_name(settings), tags, config.output.experiment,
                              config.output.tracking) as run_id:
        calibration = calibrate(chain.calibration, model, config, chain.seqlen)
        allocation = allocate(chain, model, calibration, config)  # each layer's sparsity; None: uniform
        blocks, progress = [], BlockProgress(len(chain.blocks))
        for link in chain.blocks:  # each on the outputs of the blocks before it
            blocks.append(solve_block_link(link, model, calibration, blocks, config, allocation))
            release_superseded(blocks, config.runtime)  # scratch holds a few boundaries, not one per block
            progress.advance()
        report = build_report(model, config, calibration, blocks, allocation)
        output = save_pruned_model(model, blocks, config, report)
        if not config.runtime.keep_activations:
            released = [block.outputs for block in blocks]
            release_activations(released if config.runtime.keep_calibration else [calibration.inputs, *released])
        record = report.to_json()
        tracking.log_prune_run(record, output, run_id=run_id, log_model=config.output.log_model)
        publish_block_errors(record)
        evaluation = None
        if config.evaluation is not None:
            evaluation = evaluate_model(config.evaluate_config(output), run_id=run_id)
            save_evaluation(output, evaluation)
    return PruneResult(output=output, run_id=run_id, report=report, evaluation=evaluation,
                       tracking_problem=tracking.tracking_problem(run_id, record=output))
