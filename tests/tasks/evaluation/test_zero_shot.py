"""lm-eval on the local data: same prompts, targets and accuracy as a direct per-choice log-likelihood."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from tasks.common.errors import DataError, SettingError
from tasks.config.evaluate import EvaluateConfig
from tasks.data.loading import load_examples
from tasks.evaluation.zero_shot import evaluate_zero_shot, lm_eval_task_configs
from tests.flows.test_prune_flow import VOCAB

LIMIT = 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def direct_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """sum log p(continuation | context), the continuation's tokens being those the joint text adds."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(start, len(whole)))


def official_prompts(task: str, doc: dict) -> tuple[str, list[str], int]:
    """The prompt, choices and gold index of lm-eval's piqa / arc_easy YAMLs, written out by hand."""
    if task == "piqa":
        return f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"]
    choices = doc["choices"]
    return f"Question: {doc['question']}\nAnswer:", choices["text"], choices["label"].index(doc["answerKey"])


@pytest.mark.parametrize("task", ["piqa", "arc_easy"])
def test_accuracy_equals_direct_loglikelihood(model, tokenizer, data_dir, task):
    result = evaluate_zero_shot(model, tokenizer, [task], data_dir=data_dir, limit=LIMIT, log_samples=True)
    samples = result.lm_eval["samples"][task]
    assert result.samples[task] == LIMIT == len(samples)

    docs = load_examples(task, data_dir=data_dir)[:LIMIT]
    correct = 0
    for sample, doc in zip(sorted(samples, key=lambda s: s["doc_id"]), docs):
        context, choices, gold = official_prompts(task, doc)
        direct = [direct_loglik(model, tokenizer, context, " " + choice) for choice in choices]
        harness = [response[0][0] for response in sample["resps"]]
        assert harness == pytest.approx(direct, abs=2e-3)
        assert sample["target"] == gold
        correct += max(range(len(direct)), key=direct.__getitem__) == gold
    assert result.accuracy[task] == pytest.approx(correct / LIMIT)
    assert result.metrics[task]["acc"] == result.accuracy[task]
    json.dumps(result.to_dict())  # JSON-clean


def test_local_configs_keep_the_official_prompts_and_read_absolute_paths(data_dir, tmp_path):
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    piqa, arc = lm_eval_task_configs(["piqa", "arc_challenge"], data_dir, tmp_path)
    official = load_yaml(Path(lm_eval.tasks.__file__).parent / "piqa/piqa.yaml")
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "output_type"):
        assert piqa[key] == official[key]
    assert piqa["dataset_path"] == "json" and piqa["training_split"] is None
    assert Path(piqa["dataset_kwargs"]["data_files"]["validation"]).is_absolute()
    assert arc["task"] == "arc_challenge" and arc["doc_to_target"] == "{{choices.label.index(answerKey)}}"


def test_mmlu_is_one_group_of_57_five_shot_subjects(data_dir, tmp_path):
    (name,) = lm_eval_task_configs(["mmlu"], data_dir, tmp_path)
    group = yaml.safe_load((tmp_path / "mmlu" / "_mmlu.yaml").read_text())
    assert name == "mmlu" and len(group["task"]) == 57
    subject = yaml.safe_load((tmp_path / "mmlu" / "mmlu_anatomy.yaml").read_text())
    assert subject["num_fewshot"] == 5 and subject["fewshot_config"] == {"sampler": "first_n"}
    assert subject["description"] == "The following are multiple choice questions (with answers) about anatomy.\n\n"
    assert subject["doc_to_text"].startswith("{{question.strip()}}\nA. {{choices[0]}}")
    dev = Path(subject["dataset_kwargs"]["data_files"]["dev"]).read_text().splitlines()
    assert len(dev) == 5 and all(json.loads(row)["subject"] == "anatomy" for row in dev)


def test_a_missing_local_file_and_bad_names_are_reported(tmp_path):
    with pytest.raises(DataError, match="piqa/valid.jsonl"):
        lm_eval_task_configs(["piqa"], tmp_path, tmp_path)
    with pytest.raises(SettingError, match="unknown zero-shot task"):
        lm_eval_task_configs(["hellaswag"], tmp_path, tmp_path)
    with pytest.raises(ValueError, match="zero-shot task, not a text data set"):
        EvaluateConfig(perplexity=["piqa"])
