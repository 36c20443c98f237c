"""``alps eval`` measures what its flags ask for: --tasks alone runs no perplexity, --ppl alone no lm-eval task,
and neither gives the WikiText-2 perplexity alone."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import flows.evaluate
from flows.cli import app
from tasks.evaluation.summary import EvaluationSummary


@pytest.fixture
def asked(monkeypatch):
    """The EvaluateConfig each `alps eval` call hands the flow (the flow itself is not run)."""
    seen = []

    def evaluate_model(config):
        seen.append(config)
        return EvaluationSummary(run_id="r", model=config.model, perplexity={}, accuracy={}, limit=config.limit,
                                 seconds=0.0)

    monkeypatch.setattr(flows.evaluate, "evaluate_model", evaluate_model)
    return seen


@pytest.mark.parametrize(("arguments", "perplexity", "tasks"), [
    ([], ["wikitext2"], []),
    (["--tasks", "piqa,arc_easy", "--limit", "50"], [], ["piqa", "arc_easy"]),
    (["--ppl", "c4"], ["c4"], []),
    (["--ppl", "ptb", "--tasks", "piqa"], ["ptb"], ["piqa"]),
])
def test_eval_measures_only_what_was_asked(asked, arguments, perplexity, tasks):
    result = CliRunner().invoke(app, ["eval", *arguments])
    assert result.exit_code == 0, result.output
    (config,) = asked
    assert config.perplexity == perplexity and config.tasks == tasks


def test_a_bad_eval_setting_names_the_flag(asked):
    result = CliRunner().invoke(app, ["eval", "--ppl", "piqa"])
    assert result.exit_code == 2 and "--ppl" in result.output and "zero-shot task" in result.output
    assert asked == []
