"""``alps prune`` from the command line: a tiny model end to end, and clear errors for bad settings."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.cli.base import parse_overrides
from tasks.common.errors import SettingError
from tests.flows.test_prune_flow import save_model

runner = CliRunner()


def test_prune_command_writes_a_model_and_prints_a_table(prefect_harness, tokenizer, tmp_path):
    model_dir = save_model(tmp_path / "model", tokenizer)
    result = runner.invoke(app, [
        "prune", "--model", str(model_dir), "--method", "alps-simple", "--pattern", "2:4", "--calib", "pydoc",
        "--nsamples", "4", "--seqlen", "32", "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"),
        "--device", "cpu", "--config", "max_iter=30", "--eval-seqlen", "32", "--eval-max-windows", "2",
    ])
    assert result.exit_code == 0, result.output
    assert "pruned with alps-simple at 2:4" in result.output
    assert "pydoc perplexity" in result.output  # evaluated at the end on the calibration set's held-out text
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert report["solver_config"]["max_iter"] == 30
    assert report["config"]["solver"]["pattern"] == "2:4"


@pytest.mark.parametrize(("arguments", "message"), [
    (["--sparsity", "0.5", "--pattern", "2:4"], "give one"),
    (["--pattern", "5:4"], "N (kept) must be smaller than M"),
    (["--method", "obs"], "method"),
    (["--config", "rho"], "key=value"),
    (["--config", "nonsense=1"], "no field(s) ['nonsense']"),
])
def test_bad_settings_exit_2_with_the_fix(tmp_path, arguments, message):
    result = runner.invoke(app, ["prune", "--output", str(tmp_path / "out"), *arguments])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_config_pairs_parse_json_and_nest():
    assert parse_overrides(["max_iter=5", "schedule.rho_init=0.3", "compute_dtype=float64"]) == {
        "max_iter": 5, "schedule": {"rho_init": 0.3}, "compute_dtype": "float64"}
    with pytest.raises(SettingError):
        parse_overrides(["=3"])
