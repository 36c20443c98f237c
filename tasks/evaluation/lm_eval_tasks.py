"""The lm-eval tasks we run, by our names: which lm-eval task or group each is, the local splits it reads,
and its headline metric.

| name | lm-eval task | shots | local file |
| --- | --- | --- | --- |
| ``lambada`` | ``lambada_openai`` | 0 | ``lambada/lambada_test.jsonl`` |
| ``piqa`` | ``piqa`` (validation) | 0 | ``piqa/valid.jsonl`` |
| ``arc_easy`` / ``arc_challenge`` | ``arc_easy`` / ``arc_challenge`` | 0 | ``arc/ARC-*-Test.jsonl`` |
| ``mmlu`` | group ``mmlu`` over the 57 ``mmlu_<subject>`` tasks | 5 (dev, first 5) | ``mmlu/{test,dev}.jsonl`` |
| ``gsm8k`` | ``gsm8k_cot`` (generation) | 8 (exemplars inside the YAML) | ``gsm8k/test.jsonl`` |
"""

from __future__ import annotations

from dataclasses import dataclass

from ..common.errors import SettingError

__all__ = ["ZERO_SHOT_TASKS", "LmEvalTask", "check_task_names", "unknown_task"]


@dataclass(frozen=True)
class LmEvalTask:
    """How one of our task names maps onto lm-eval: its YAML, the splits we supply, the headline metric."""

    name: str  # our name (tasks.data)
    task: str  # lm-eval's task or group name
    yaml: str  # path under lm_eval/tasks
    splits: dict[str, str]  # lm-eval split key -> our split name (tasks.data)
    metric: str  # headline metric key in lm-eval's results, e.g. "acc,none"


ZERO_SHOT_TASKS: dict[str, LmEvalTask] = {
    spec.name: spec
    for spec in (
        LmEvalTask("lambada", "lambada_openai", "lambada/lambada_openai.yaml", {"test_split": "test"}, "acc,none"),
        LmEvalTask("piqa", "piqa", "piqa/piqa.yaml", {"validation_split": "validation"}, "acc,none"),
        LmEvalTask("arc_easy", "arc_easy", "arc/arc_easy.yaml", {"test_split": "test"}, "acc,none"),
        LmEvalTask("arc_challenge", "arc_challenge", "arc/arc_challenge.yaml", {"test_split": "test"}, "acc,none"),
        LmEvalTask("mmlu", "mmlu", "mmlu/default", {"test_split": "test", "fewshot_split": "dev"}, "acc,none"),
        LmEvalTask("gsm8k", "gsm8k_cot", "gsm8k/gsm8k-cot.yaml", {"test_split": "test"}, "exact_match,strict-match"),
    )
}


def unknown_task(names: list[str]) -> str | None:
    """The first name that is not one of ZERO_SHOT_TASKS, or None."""
    return next((name for name in names if name not in ZERO_SHOT_TASKS), None)


def check_task_names(names: list[str]) -> list[str]:
    """The names, validated against ZERO_SHOT_TASKS (SettingError naming the field otherwise)."""
    name = unknown_task(names)
    if name is not None:
        raise SettingError("tasks", name, "unknown zero-shot task", f"use {', '.join(ZERO_SHOT_TASKS)}")
    return names
