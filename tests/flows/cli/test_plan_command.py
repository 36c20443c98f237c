"""``alps plan``: a plan for a bare config.json on a planned GPU, and for a local model on this machine."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from flows.cli import app
from tests.flows.test_prune_flow import save_model
from tests.tasks.planning.test_planning import LLAMA_70B

runner = CliRunner()
GIVEN_GPU = ["--device", "cuda", "--matmul-gflops", "50000", "--eigh-seconds", "1.0"]


def test_a_70b_plan_from_its_config_json_holds_a_few_boundaries(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_70B))
    result = runner.invoke(app, ["plan", "--model", str(path), "--nsamples", "128", "--seqlen", "2048", *GIVEN_GPU,
                                 "--activation-dtype", "float32",
                                 "--device-memory", "80", "--json", str(tmp_path / "plan.json")], terminal_width=120)
    assert result.exit_code == 0, result.output
    assert "3 boundaries of 8.59 GB" in result.output and "It fits the given device memory" in result.output
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["activation_bytes"] == 3 * 128 * 2048 * 8192 * 4 and plan["device"] == "cuda"

    small = runner.invoke(app, ["plan", "--model", str(path), "--nsamples", "128", "--seqlen", "2048", *GIVEN_GPU,
                                "--device-memory", "24"], terminal_width=120)
    assert small.exit_code == 2
    assert "device memory needs" in small.output and "--offload-activations" in small.output


def test_a_plan_for_this_machine_and_one_rate_alone_is_an_error(tokenizer, tmp_path):
    model_dir = save_model(tmp_path / "model", tokenizer)
    result = runner.invoke(app, ["plan", "--model", str(model_dir), "--nsamples", "4", "--seqlen", "32",
                                 "--device", "cpu", "--cache-dir", str(tmp_path / "cache")], terminal_width=120)
    assert result.exit_code == 0, result.output
    assert "It fits this machine" in result.output and "measured on cpu" in result.output
    half = runner.invoke(app, ["plan", "--model", str(model_dir), "--matmul-gflops", "10"])
    assert half.exit_code == 2 and "give both rates" in half.output
