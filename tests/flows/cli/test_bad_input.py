"""Bad input on the command line: every option of the README's table with an out-of-range, wrong-type or
nonsense value gives one line naming the flag, the value and the fix, exit status 2, no traceback, and no output
or cache folder, all before the flow starts (no Prefect server, no MLflow run).

The commands run in process on a tiny random LLaMA (2 blocks, hidden 64, 128 positions, the bundled tokenizer)
calibrated on pydoc; the flows are replaced by a stand-in that fails the test if a command gets that far.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import flows.evaluate
import flows.prune
import flows.sweep
from flows.cli import app
from tests.flows.test_prune_flow import save_model

runner = CliRunner()


class FlowStarted(Exception):
    """A command called its flow: the input was not refused before it."""


def _flow_started(*args, **kwargs):
    raise FlowStarted


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("bad-input") / "model", tokenizer)


@pytest.fixture(autouse=True)
def no_flow(monkeypatch):
    for module, name in ((flows.prune, "prune_model"), (flows.sweep, "sweep_models"),
                         (flows.evaluate, "evaluate_model")):
        monkeypatch.setattr(module, name, _flow_started)


def _base(command: str, model_dir: Path, tmp_path: Path) -> list[str]:
    """Settings every check passes, for ``command``; each case adds the one bad option (the last value wins)."""
    common = ["--model", str(model_dir), "--device", "cpu"]
    run = [*common, "--calib", "pydoc", "--nsamples", "4", "--seqlen", "32", "--cache-dir", str(tmp_path / "cache")]
    return {
        "prune": [*run, "--output", str(tmp_path / "out")],
        "sweep": [*run, "--methods", "magnitude", "--patterns", "0.5", "--output", str(tmp_path / "out")],
        "eval": [*common, "--ppl", "pydoc", "--output", str(tmp_path / "out")],
        "plan": [*common, "--nsamples", "4", "--seqlen", "32", "--output", str(tmp_path / "out")],
        "ppl": [*common, "--datasets", "pydoc", "--output", str(tmp_path / "out")],
    }[command]


def _invoke(command: str, arguments: list[str], model_dir: Path, tmp_path: Path):
    (tmp_path / "a-file").write_text("not a folder")
    arguments = [argument.replace("TMP", str(tmp_path)) for argument in arguments]
    return runner.invoke(app, [command, *_base(command, model_dir, tmp_path), *arguments])


# (command, the bad arguments, the flag the message names, the value it names, what else it says). TMP is the
# test's folder, which holds a file "a-file".
CASES = [
    ("prune", ["--sparsity", "nan"], "--sparsity", "nan", "[0, 1)"),
    ("prune", ["--sparsity", "inf"], "--sparsity", "inf", "[0, 1)"),
    ("prune", ["--sparsity", "-0.1"], "--sparsity", "-0.1", "[0, 1)"),
    ("prune", ["--sparsity", "1.0"], "--sparsity", "1.0", "[0, 1)"),
    ("prune", ["--sparsity", "0.999999"], "--sparsity", "0.999999", "would keep none of its weights"),
    ("prune", ["--sparsity", "abc"], "--sparsity", "abc", "not a number"),
    ("prune", ["--sparsity", "0.5", "--pattern", "2:4"], "--sparsity/--pattern", "0.5/2:4", "both given"),
    ("prune", ["--pattern", "0:4"], "--pattern", "0:4", "0 would keep no weight"),
    ("prune", ["--pattern", "4:4"], "--pattern", "4:4", "nothing would be pruned"),
    ("prune", ["--pattern", "5:4"], "--pattern", "5:4", "cannot keep 5 of every 4"),
    ("prune", ["--pattern", "2:0"], "--pattern", "2:0", "M (group size) must be at least 2"),
    ("prune", ["--pattern", "2:3"], "--pattern", "2:3", "not divisible by M=3"),
    ("prune", ["--pattern", "abc"], "--pattern", "abc", "not understood"),
    ("prune", ["--pattern", "rows:1.5"], "--pattern", "rows:1.5", "[0, 1)"),
    ("prune", ["--pattern", "channels:-1"], "--pattern", "channels:-1", "[0, 1)"),
    ("prune", ["--pattern", "rows:0.9999"], "--pattern", "rows:0.9999", "would keep none of its weights"),
    ("prune", ["--method", "nope"], "--method", "nope", "alps-simple"),
    ("prune", ["--config", "unknown_key=1"], "--config", "unknown_key=1", "no field(s) ['unknown_key']"),
    ("prune", ["--config", "max_iter=-3"], "--config", "max_iter=-3", "integer >= 1"),
    ("prune", ["--config", "max_iter=abc"], "--config", "max_iter=abc", "integer >= 1"),
    ("prune", ["--config", "noequals"], "--config", "noequals", "key=value"),
    ("prune", ["--gram-dtype", "float16"], "--gram-dtype", "float16", "'float32' or 'float64'"),
    ("prune", ["--gram-dtype", "x"], "--gram-dtype", "x", "'float32' or 'float64'"),
    ("prune", ["--targets", "teacher"], "--targets", "teacher", "'layer' or 'dense'"),
    ("prune", ["--targets", "dense", "--method", "magnitude"], "--method", "magnitude", "sees the weights alone"),
    ("prune", ["--targets", "dense", "--target-mix", "0"], "--target-mix", "0", "greater than 0"),
    ("prune", ["--targets", "dense", "--target-mix", "1.5"], "--target-mix", "1.5", "less than or equal to 1"),
    ("prune", ["--target-mix", "0.5"], "--target-mix", "0.5", "add targets 'dense'"),
    ("prune", ["--refine", "sgd"], "--refine", "sgd", "'none' or 'adam'"),
    ("prune", ["--refine", "adam", "--refine-epochs", "0"], "--refine-epochs", "0", "greater than or equal to 1"),
    ("prune", ["--refine", "adam", "--refine-epochs", "x"], "--refine-epochs", "x", "integer"),
    ("prune", ["--refine", "adam", "--refine-lr", "0"], "--refine-lr", "0", "greater than 0"),
    ("prune", ["--refine", "adam", "--refine-batch", "0"], "--refine-batch", "0", "greater than or equal to 1"),
    ("prune", ["--refine-epochs", "3"], "--refine", "epochs", "--refine adam"),
    ("prune", ["--allocation", "lamp"], "--allocation", "lamp", "'uniform', 'owl' or 'error'"),
    ("prune", ["--allocation-granularity", "row", "--allocation", "error"], "--allocation-granularity", "row",
     "'layer', 'block' or 'layer-in-block'"),
    ("prune", ["--allocation-granularity", "block"], "--allocation-granularity", "block", "add method 'error'"),
    ("prune", ["--allocation", "owl", "--pattern", "2:4"], "--pattern", "2:4", "give a fraction"),
    ("prune", ["--allocation-spread", "1.5"], "--allocation-spread", "1.5", "less than 1"),
    ("prune", ["--allocation-spread", "x"], "--allocation-spread", "x", "number"),
    ("prune", ["--owl-threshold", "0"], "--owl-threshold", "0", "greater than 0"),
    ("prune", ["--sparsity-bounds", "0.9,0.5"], "--sparsity-bounds", "0.9", "below min_sparsity"),
    ("prune", ["--sparsity-bounds", "0.5"], "--sparsity-bounds", "0.5", "not two numbers"),
    ("prune", ["--sparsity-bounds", "a,b"], "--sparsity-bounds", "a", "number"),
    ("prune", ["--allocation", "owl", "--sparsity", "0.7", "--sparsity-bounds", "0.8,0.9"], "--sparsity", "0.7",
     "outside the allocation's bounds"),
    ("prune", ["--calib", "nope"], "--calib", "nope", "not a data set"),
    ("prune", ["--calib", "piqa"], "--calib", "piqa", "no training split"),
    ("prune", ["--nsamples", "0"], "--nsamples", "0", "1 or more"),
    ("prune", ["--nsamples", "-1"], "--nsamples", "-1", "1 or more"),
    ("prune", ["--nsamples", "x"], "--nsamples", "x", "whole number"),
    # More windows than pydoc's training text holds (seqlen capped at the model's 128 positions): refused before
    # any block is solved.
    ("prune", ["--nsamples", "100000", "--seqlen", "2048"], "--nsamples", "100000", "windows would repeat text"),
    ("prune", ["--seqlen", "0"], "--seqlen", "0", "2 or more"),
    ("prune", ["--seqlen", "-5"], "--seqlen", "-5", "2 or more"),
    ("prune", ["--seed", "x"], "--seed", "x", "whole number"),
    ("prune", ["--activation-dtype", "int8"], "--activation-dtype", "int8", "'bfloat16'"),
    ("prune", ["--device", "tpu"], "--device", "tpu", "cuda:N"),
    ("prune", ["--device", "cuda:x"], "--device", "cuda:x", "cuda:N"),
    ("prune", ["--threads", "0"], "--threads", "0", "1 or more"),
    ("prune", ["--batch-size", "0"], "--batch-size", "0", "1 or more"),
    ("prune", ["--task-runner", "spark"], "--task-runner", "spark", "'threads', 'dask' or 'ray'"),
    ("prune", ["--solve-workers", "0"], "--solve-workers", "0", "1 or more"),
    ("prune", ["--runner-address", "tcp://x:8786"], "--runner-address", "tcp://x:8786", "dask or ray"),
    ("prune", ["--cache-dir", "TMP/a-file"], "--cache-dir", "a-file", "not a folder"),
    ("prune", ["--data-dir", "TMP/nowhere"], "--data-dir", "nowhere", "does not exist"),
    ("prune", ["--keep-every", "-1"], "--keep-every", "-1", "0 or more"),
    ("prune", ["--model", "TMP/nowhere"], "--model", "nowhere", "not a known model reference"),
    ("prune", ["--model", "TMP"], "--model", "TMP", "no config.json"),
    ("prune", ["--output", "TMP/a-file"], "--output", "a-file", "not a folder"),
    ("prune", ["--experiment", ""], "--experiment", "''", "at least 1 character"),
    ("prune", ["--eval-ppl", "nope"], "--eval-ppl", "nope", "not a data set"),
    ("prune", ["--eval-ppl", "piqa"], "--eval-ppl", "piqa", "zero-shot task"),
    ("prune", ["--eval-tasks", "nope"], "--eval-tasks", "nope", "unknown zero-shot task"),
    ("prune", ["--eval-limit", "0"], "--eval-limit", "0", "1 or more"),
    ("prune", ["--eval-max-windows", "0"], "--eval-max-windows", "0", "1 or more"),
    ("prune", ["--eval-seqlen", "0"], "--eval-seqlen", "0", "2 or more"),
    ("sweep", ["--patterns", "0.5,4:4"], "--patterns", "4:4", "nothing would be pruned"),
    ("sweep", ["--patterns", "0.5,0.999999"], "--patterns", "0.999999", "would keep none of its weights"),
    ("sweep", ["--methods", "magnitude,nope"], "--methods", "nope", "is unknown"),
    ("sweep", ["--methods", "alps", "--config", "max_iter=-3"], "--config", "max_iter=-3", "integer >= 1"),
    ("sweep", ["--nsamples", "100000"], "--nsamples", "100000", "windows would repeat text"),
    ("sweep", ["--concurrency", "0"], "--concurrency", "0", "1 or more"),
    ("sweep", ["--output", "TMP/a-file"], "--output", "a-file", "not a folder"),
    ("eval", ["--seqlen", "0"], "--seqlen", "0", "2 or more"),
    ("eval", ["--max-windows", "0"], "--max-windows", "0", "1 or more"),
    ("eval", ["--limit", "x"], "--limit", "x", "whole number"),
    ("eval", ["--ppl", "nope"], "--ppl", "nope", "not a data set"),
    ("eval", ["--tasks", "nope"], "--tasks", "nope", "unknown zero-shot task"),
    ("eval", ["--dtype", "int8"], "--dtype", "int8", "'bfloat16'"),
    ("eval", ["--device", "tpu"], "--device", "tpu", "cuda:N"),
    ("eval", ["--model", "TMP/nowhere"], "--model", "nowhere", "not a known model reference"),
    ("eval", ["--data-dir", "TMP/nowhere"], "--data-dir", "nowhere", "does not exist"),
    ("plan", ["--pattern", "5:4"], "--pattern", "5:4", "cannot keep 5 of every 4"),
    ("plan", ["--nsamples", "x"], "--nsamples", "x", "whole number"),
    ("plan", ["--allocation", "lamp"], "--allocation", "lamp", "'uniform', 'owl' or 'error'"),
    ("plan", ["--allocation", "error", "--pattern", "2:4"], "--pattern", "2:4", "give a fraction"),
    ("plan", ["--model", "TMP/nowhere"], "--model", "nowhere", "not a known model reference"),
    ("ppl", ["--threads", "x"], "--threads", "x", "whole number"),
]


@pytest.mark.parametrize(("command", "arguments", "flag", "value", "says"), CASES,
                         ids=[f"{case[0]} {' '.join(case[1])}" for case in CASES])
def test_bad_input_is_one_line_naming_flag_value_and_fix(model_dir, tmp_path, command, arguments, flag, value, says):
    result = _invoke(command, arguments, model_dir, tmp_path)
    assert not isinstance(result.exception, FlowStarted), f"{flag} {value} was not refused before the flow"
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    message = lines[0].replace(str(tmp_path), "TMP")
    assert message.startswith(f"Error: {flag}=") and value in message and "Fix:" in message, message
    assert says in message, message
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    assert (tmp_path / "a-file").read_text() == "not a folder"


@pytest.mark.parametrize("command", ["prune", "sweep", "eval", "plan"])
def test_the_settings_the_cases_change_pass_every_check(model_dir, tmp_path, command):
    """Each case above fails for its own option: with the rest of its settings, the command gets to its flow (or,
    for the plan, to its table)."""
    result = _invoke(command, [], model_dir, tmp_path)
    if command == "plan":
        assert result.exit_code == 0 and "Plan:" in result.output, result.output
    else:
        assert isinstance(result.exception, FlowStarted), result.output
