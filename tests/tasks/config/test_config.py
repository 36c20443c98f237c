"""The settings objects: parsed once, one place for every default, JSON round trips, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from alps_solver import SparsityPattern
from alps_solver.alps import Config as AlpsConfig
from tasks.common.errors import SettingError
from tasks.config.evaluate import EvaluateConfig, EvaluationSpec
from tasks.config.prune import PruneConfig, SolverSpec
from tasks.config.sweep import SweepConfig
from tasks.config.validation import validated

REPO = Path(__file__).resolve().parents[3]


def test_the_pattern_is_parsed_once_and_travels_as_its_type():
    spec = SolverSpec(pattern="2:4")
    assert spec.pattern == SparsityPattern.n_m(2, 4)
    assert SolverSpec(pattern=0.7).pattern == SparsityPattern.unstructured(0.7)
    assert spec.model_dump(mode="json")["pattern"] == "2:4"
    assert SolverSpec.model_validate_json(spec.model_dump_json()) == spec


def test_the_method_config_has_its_defaults_and_preset():
    spec = SolverSpec(method="alps", method_config={"max_iter": 40})
    assert isinstance(spec.solver_config, AlpsConfig) and spec.solver_config.max_iter == 40
    assert SolverSpec(method="alps-simple").solver_config == AlpsConfig.simple()


def test_a_prune_config_round_trips_through_json():
    config = PruneConfig(model="m", solver={"method": "wanda", "pattern": "rows:0.6"},
                         calibration={"dataset": "pydoc", "nsamples": 4}, runtime={"threads": 2},
                         output={"folder": "out/x"}, evaluation=None)
    again = PruneConfig.model_validate_json(config.model_dump_json())
    assert again == config and again.solver.pattern == SparsityPattern.per_row(0.6)
    assert again.evaluation is None and again.output.folder == Path("out/x")


@pytest.mark.parametrize(("settings", "field", "text"), [
    ({"solver": {"pattern": "1.2"}}, "solver.pattern", "sparsity"),
    ({"solver": {"pattern": "4:4"}}, "solver.pattern", "N (kept)"),
    ({"solver": {"method": "obs"}}, "solver.method", "obs"),
    ({"solver": {"method_config": {"nonsense": 1}}}, "solver", "nonsense"),  # checked with the method
    ({"calibration": {"nsamples": 0}}, "calibration.nsamples", "greater than or equal to 1"),
    ({"runtime": {"task_runner": "slurm"}}, "runtime.task_runner", "threads"),
    ({"evaluation": {"tasks": ["hellaswag"]}}, "evaluation.tasks", "unknown zero-shot task"),
    ({"evaluation": {"perplexity": ["piqa"]}}, "evaluation.perplexity", "zero-shot task"),
    ({"nsamples": 4}, "nsamples", "Extra inputs"),
])
def test_a_bad_setting_names_its_field(settings, field, text):
    with pytest.raises(SettingError) as info:
        validated(PruneConfig, settings, fix="see `alps prune --help`")
    assert info.value.field == field and text in str(info.value) and "alps prune --help" in str(info.value)
    with pytest.raises(ValidationError):
        PruneConfig(**settings)


def test_validated_names_the_flag_the_user_typed():
    with pytest.raises(SettingError, match="--nsamples=0"):
        validated(PruneConfig, {"calibration": {"nsamples": 0}}, names={"calibration.nsamples": "--nsamples"})


def test_the_evaluation_of_a_prune_run_uses_its_runtime_and_calibration_text():
    config = PruneConfig(calibration={"dataset": "pydoc"}, runtime={"device": "cpu", "threads": 3},
                         output={"experiment": "e", "log_model": True}, evaluation={"max_windows": 2})
    evaluation = config.evaluate_config(Path("/out/pruned"))
    assert isinstance(evaluation, EvaluateConfig)
    assert evaluation.model == "/out/pruned" and evaluation.perplexity == ["pydoc"] and evaluation.max_windows == 2
    assert (evaluation.device, evaluation.threads, evaluation.experiment, evaluation.log_model) == ("cpu", 3, "e", True)
    chosen = PruneConfig(evaluation={"perplexity": ["wikitext2"], "tasks": ["piqa"]}).evaluate_config(Path("/o"))
    assert chosen.perplexity == ["wikitext2"] and chosen.tasks == ["piqa"]


def test_every_default_is_written_once():
    # The evaluation a prune run ends with is an EvaluationSpec; the evaluation flow's own defaults differ only
    # in what they must name themselves (a model, and perplexity data sets instead of the calibration text).
    spec, flow = EvaluationSpec(), EvaluateConfig()
    shared = set(EvaluationSpec.model_fields) - {"perplexity"}
    assert {name: getattr(spec, name) for name in shared} == {name: getattr(flow, name) for name in shared}
    # The deployments name only what they choose; the rest comes from the config classes.
    deployments = {d["name"]: d for d in yaml.safe_load((REPO / "deployments/prefect.yaml").read_text())["deployments"]}
    prune = deployments["prune-on-demand"]["parameters"]["config"]
    assert set(prune) == {"output"} and PruneConfig(**prune).solver == PruneConfig().solver
    sweep = SweepConfig(**deployments["nightly-sweep"]["parameters"]["config"])
    assert sweep.methods == SweepConfig().methods and sweep.calibration == SweepConfig().calibration


def test_a_sweep_plans_one_config_per_method_and_pattern(tmp_path):
    sweep = SweepConfig(model="m", methods=["alps", "wanda"], patterns=["0.5", "2:4"], output=tmp_path,
                        solver={"true_sequential": True}, runtime={"threads": 2})
    configs = sweep.plan()
    assert [(c.solver.method, str(c.solver.pattern)) for c in configs] == [
        ("alps", "0.5"), ("alps", "2:4"), ("wanda", "0.5"), ("wanda", "2:4")]
    assert [c.output.folder.name for c in configs] == ["alps-0.5", "alps-2_4", "wanda-0.5", "wanda-2_4"]
    assert all(c.solver.true_sequential and c.runtime.threads == 2 and c.runtime.keep_calibration
               and c.output.overwrite and c.calibration == sweep.calibration for c in configs)
    with pytest.raises(ValidationError, match="max_iter"):  # a setting one of the methods lacks fails at once
        SweepConfig(methods=["alps", "magnitude"], solver={"method_config": {"max_iter": 5}})
