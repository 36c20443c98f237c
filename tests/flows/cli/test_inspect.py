"""The `alps` command line: help on every command, data listing, perplexity output and user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.evaluation.perplexity import evaluate_perplexity

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    """Exit code and the output (stdout and stderr) with whitespace normalised (rich wraps lines)."""
    result = runner.invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ((), ("models", "data", "ppl", "--log-level")),
        (("models",), ()),
        (("data",), ("--data-dir",)),
        (("ppl",), ("--model", "--datasets", "--seqlen", "--batch-size", "--max-windows", "--output", "--threads")),
    ],
)
def test_every_command_has_help(command: tuple[str, ...], options: tuple[str, ...]) -> None:
    code, output = invoke(*command, "--help")
    assert code == 0
    assert "Usage: alps" in output
    for option in options:
        assert option in output


def test_models_lists_the_bundled_model(smollm2) -> None:
    code, output = invoke("models")
    assert code == 0
    assert "smollm2-135m" in output and "converted" in output and "org/name@revision" in output


def test_data_lists_counts_of_local_files(data_dir: Path) -> None:
    code, output = invoke("data", "--data-dir", str(data_dir))
    assert code == 0
    for count in ("4358", "3761", "5153", "1838", "2376", "1172", "14042", "1319"):
        assert f" {count} " in output
    assert "missing" in output  # ptb has no local training split


def test_data_with_a_missing_root_exits_with_the_fix(tmp_path: Path) -> None:
    code, output = invoke("data", "--data-dir", str(tmp_path / "absent"))
    assert code == 2
    assert f"Error: --data-dir='{tmp_path / 'absent'}': the data root" in output
    assert "Fix:" in output


def test_ppl_writes_json_that_matches_the_library(smollm2, data_dir: Path, tmp_path: Path) -> None:
    output_file = tmp_path / "out" / "ppl.json"
    code, output = invoke(
        "ppl", "--datasets", "pydoc", "--seqlen", "128", "--max-windows", "2",
        "--data-dir", str(data_dir), "--output", str(output_file), "--threads", "1",
    )
    assert code == 0, output
    assert "pydoc" in output and "2/" in output
    written = json.loads(output_file.read_text())
    assert written["model"]["kind"] == "bundled" and written["model"]["fingerprint"].startswith("sha256:")
    assert written["settings"]["seqlen"] == 128
    [result] = written["results"]
    model, tokenizer = smollm2
    expected = evaluate_perplexity(model, tokenizer, "pydoc", seqlen=128, max_windows=2)
    assert result["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--seqlen", "1"), "Error: seqlen=1: a window needs at least 2 tokens"),
        (("--datasets", "mmlu"), "Error: --datasets='mmlu': a zero-shot task has no perplexity text"),
        (("--datasets", "wikitext9"), "Error: dataset='wikitext9': unknown data set"),
        (("--model", "nonsense model"), "Error: model='nonsense model': not a known model reference"),
    ],
)
def test_ppl_bad_input_exits_with_problem_and_fix(args: tuple[str, ...], message: str) -> None:
    code, output = invoke("ppl", *args)
    assert code == 2
    assert message in output and "Fix:" in output
