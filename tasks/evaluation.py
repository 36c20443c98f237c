"""Evaluation tasks: perplexity and lm-evaluation-harness accuracy, offline from the local data root.

The Prefect tasks at the end (load, perplexity, lm-eval, publish) are what ``flows/evaluate.py`` composes;
``EvaluateConfig`` is its validated parameter set.

Every task is built from lm-eval's own installed task definition (its YAML, includes resolved), so the
prompts (``doc_to_text``), targets, choices, few-shot settings, filters and metrics are lm-eval's, and the
numbers compare with published ones. With a data root only the data source is replaced: ``dataset_path``
becomes ``json`` with ABSOLUTE ``data_files`` (relative ones would resolve against the working directory),
and splits the local data does not have are dropped. Without a data root the definitions are used as they
are (lm-eval's own Hub data sets; needs the network).

| name | lm-eval task | shots | local file |
| --- | --- | --- | --- |
| ``lambada`` | ``lambada_openai`` | 0 | ``lambada/lambada_test.jsonl`` |
| ``piqa`` | ``piqa`` (validation) | 0 | ``piqa/valid.jsonl`` |
| ``arc_easy`` / ``arc_challenge`` | ``arc_easy`` / ``arc_challenge`` | 0 | ``arc/ARC-*-Test.jsonl`` |
| ``mmlu`` | group ``mmlu`` over the 57 ``mmlu_<subject>`` tasks | 5 (dev, first 5) | ``mmlu/{test,dev}.jsonl`` |
| ``gsm8k`` | ``gsm8k_cot`` (generation) | 8 (exemplars inside the YAML) | ``gsm8k/test.jsonl`` |

MMLU: lm-eval's ``mmlu`` nests four category groups; here the 57 subject tasks (each lm-eval's own
subject YAML: description line, ``A.``-``D.`` template, the subject's 5 dev exemplars with ``first_n``)
sit directly in one ``mmlu`` group whose ``acc`` is weighted by subject size, which equals lm-eval's
overall ``mmlu`` accuracy. Locally the per-subject test and dev rows are written to a temporary folder.
lm-eval's ``mmlu`` is evaluated with ``--num_fewshot 5`` in the papers; the config sets it per task.

GSM8K: lm-eval's plain ``gsm8k`` draws its 5 shots from the train split, which the local data does not
have; ``gsm8k_cot`` carries its 8 chain-of-thought exemplars in the YAML, so it runs on the test file alone.
It generates, so it is slow on CPU: use ``limit``.

``limit`` applies per lm-eval task: for MMLU that is per subject (57 x limit questions).
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import DatasetKind, dataset_spec, load_examples, resolve_data_root
from .errors import SettingError
from .logs import run_logger
from .perplexity import evaluate_perplexity
from .remote import register_by_reference
from .storage import PRUNE_REPORT_FILE

__all__ = [
    "ZERO_SHOT_TASKS",
    "EvaluateConfig",
    "LmEvalTask",
    "ZeroShotResult",
    "check_task_names",
    "evaluate_zero_shot",
    "lm_eval_task_configs",
    "load_for_evaluation",
    "measure_perplexity",
    "measure_zero_shot",
    "metric_name",
    "publish_evaluation",
]

logger = logging.getLogger(__name__)

MMLU_SHOTS = 5
_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


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


@dataclass
class ZeroShotResult:
    """Headline accuracy per task (our names), every numeric metric, and lm-eval's results (JSON-clean)."""

    accuracy: dict[str, float]
    metrics: dict[str, dict[str, float]]  # task -> metric (lm-eval key with ",filter" made name-safe) -> value
    samples: dict[str, int]  # task -> evaluated items
    limit: int | None
    seconds: float
    lm_eval: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_task_names(names: list[str]) -> list[str]:
    """The names, validated against ZERO_SHOT_TASKS (SettingError naming the field otherwise)."""
    for name in names:
        if name not in ZERO_SHOT_TASKS:
            raise SettingError("--tasks", name, "unknown zero-shot task", f"use {', '.join(ZERO_SHOT_TASKS)}")
    return names


def lm_eval_task_configs(names: list[str], data_dir: str | Path | None, scratch: Path) -> list[dict[str, Any] | str]:
    """lm-eval task config dicts for ``names`` (MMLU: the name of a group written under ``scratch``); local
    data when a data root is configured. ``scratch`` must be the TaskManager's include path and outlive the
    evaluation."""
    root = resolve_data_root(data_dir)
    configs = []
    for name in check_task_names(names):
        spec = ZERO_SHOT_TASKS[name]
        if name == "mmlu":
            configs.append(_mmlu_group(root, data_dir, scratch))
            continue
        config = _official_config(spec.yaml)
        if root is not None:
            files = {split: _local_file(root, name, split) for split in spec.splits.values()}
            config = _with_local_data(config, files, spec.splits)
        configs.append(config)
    return configs


def evaluate_zero_shot(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    log_samples: bool = False,
) -> ZeroShotResult:
    """Accuracy of ``model`` on ``tasks`` (our names) with lm-eval; the device is the model's own."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if limit is not None and limit < 1:
        raise SettingError("--limit", limit, "must be at least 1 (or unset for every item)", "omit --limit")
    started = time.perf_counter()
    device = str(next(model.parameters()).device)  # HFLM defaults to cuda: always pass it
    with tempfile.TemporaryDirectory(prefix="alps-lm-eval-") as scratch:
        configs = lm_eval_task_configs(tasks, data_dir, Path(scratch))
        # Only our own configs are indexed: lm-eval's defaults name Hub data sets.
        manager = TaskManager(include_path=scratch, include_defaults=False)
        output = lm_eval.simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device),
            tasks=configs,
            task_manager=manager,
            limit=limit,
            bootstrap_iters=0,
            log_samples=log_samples,
        )
    # lm-eval's results hold numpy numbers, dtypes and callables: a JSON round trip makes them plain.
    clean = json.loads(json.dumps(output, default=str))
    metrics, accuracy, samples = {}, {}, {}
    for name in tasks:
        spec = ZERO_SHOT_TASKS[name]
        raw = clean["results"][spec.task]
        metrics[name] = {
            metric_name(key): float(value)
            for key, value in raw.items()
            if "," in key and "_stderr" not in key and isinstance(value, (int, float)) and math.isfinite(value)
        }
        accuracy[name] = float(raw[spec.metric])
        samples[name] = _sample_count(clean, spec.task)
        logger.info("%s: %s %.4f over %d items", name, spec.metric, accuracy[name], samples[name])
    return ZeroShotResult(
        accuracy=accuracy,
        metrics=metrics,
        samples=samples,
        limit=limit,
        seconds=time.perf_counter() - started,
        lm_eval=clean,
    )


def metric_name(key: str) -> str:
    """lm-eval's ``metric,filter`` key as a name MLflow accepts: ``acc,none`` -> ``acc``."""
    metric, _, filter_name = key.partition(",")
    name = metric if filter_name in ("", "none") else f"{metric}_{filter_name}"
    return re.sub(r"[^\w.\-/ ]", "_", name)


def _sample_count(results: dict[str, Any], task: str) -> int:
    counts = results.get("n-samples", {})
    if task in counts:
        return int(counts[task]["effective"])
    # A group: the sum over its member tasks.
    members = results.get("group_subtasks", {}).get(task, [])
    return sum(int(counts[m]["effective"]) for m in members if m in counts)


def _official_config(relative: str) -> dict[str, Any]:
    """lm-eval's installed task YAML as a dict, includes and ``!function`` tags resolved."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(lm_eval.tasks.__file__).parent / relative)
    config.pop("tag", None)  # tags would register our copies under lm-eval's tag names
    return config


def _with_local_data(config: dict[str, Any], files: dict[str, Path], splits: dict[str, str]) -> dict[str, Any]:
    """``config`` reading the given local JSON-lines files; split keys we do not supply are cleared."""
    local = {**config, "dataset_path": "json", "dataset_name": None}
    local["dataset_kwargs"] = {"data_files": {split: str(path.resolve()) for split, path in files.items()}}
    for key in _SPLIT_KEYS:
        local[key] = splits.get(key)
    return local


def _local_file(root: Path, name: str, split: str) -> Path:
    """The local file of a split, checked by loading it (a missing file raises DataError naming the path)."""
    load_examples(name, split, root)
    return root / dataset_spec(name).splits[split].file


def _mmlu_group(root: Path | None, data_dir: str | Path | None, scratch: Path) -> str:
    """Write one ``mmlu`` group over the 57 subject tasks (acc weighted by subject size = overall acc) as
    YAML files under ``scratch`` (lm-eval 0.4.13 cannot build a group given inline as a dict); its name."""
    import yaml

    spec = ZERO_SHOT_TASKS["mmlu"]
    by_split: dict[str, dict[str, list[dict[str, Any]]]] = {}  # split -> subject -> rows
    if root is None:
        import lm_eval.tasks

        folder = Path(lm_eval.tasks.__file__).parent / spec.yaml
        subjects = sorted(p.stem.removeprefix("mmlu_") for p in folder.glob("mmlu_*.yaml"))
    else:
        for split in spec.splits.values():
            for row in load_examples("mmlu", split, data_dir):
                by_split.setdefault(split, {}).setdefault(row["subject"], []).append(row)
        subjects = sorted(by_split["test"])
    folder = scratch / "mmlu"
    folder.mkdir(parents=True, exist_ok=True)
    members = []
    for subject in subjects:
        config = {**_official_config(f"{spec.yaml}/mmlu_{subject}.yaml"), "num_fewshot": MMLU_SHOTS}
        if root is not None:
            files = {}
            for split, rows in by_split.items():
                path = folder / f"mmlu_{subject}_{split}.jsonl"
                path.write_text("".join(json.dumps(row) + "\n" for row in rows[subject]), encoding="utf-8")
                files[split] = path
            config = _with_local_data(config, files, spec.splits)
        (folder / f"mmlu_{subject}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        members.append(config["task"])
    group = {
        "group": spec.task,
        "task": members,
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
        "metadata": {"version": 2},
    }
    (folder / "_mmlu.yaml").write_text(yaml.safe_dump(group, sort_keys=False), encoding="utf-8")
    return spec.task


# ------------------------------------------------------------------------------------------ flow boundary
class EvaluateConfig(BaseModel):
    """The evaluation flow's parameters (pydantic at the boundary)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("smollm2-135m", description="bundled name, local folder, .gguf file or hub id[@revision]")
    perplexity: list[str] = Field(["wikitext2", "ptb", "c4"], description="text data sets for perplexity")
    tasks: list[str] = Field(["piqa", "arc_easy", "arc_challenge", "lambada"],
                             description="lm-eval tasks: " + ", ".join(ZERO_SHOT_TASKS))
    limit: int | None = Field(None, ge=1, description="items per lm-eval task (MMLU: per subject); all if unset")
    seqlen: int = Field(2048, ge=2, description="perplexity window (capped by the model's context)")
    max_windows: int | None = Field(None, ge=1, description="score only the first N perplexity windows")
    ppl_batch_size: int = Field(1, ge=1, description="perplexity windows per forward pass")
    batch_size: int = Field(8, ge=1, description="lm-eval batch size")
    dtype: str = "float32"
    device: str = Field("auto", description="auto (cuda when present, else cpu), cpu, cuda, cuda:N")
    threads: int | None = Field(None, ge=1, description="torch CPU threads")
    data_dir: Path | None = Field(None, description="local data root; default $ALPS_DATA_DIR, else the Hub")
    prune_report: Path | None = Field(None, description="prune_report.json to log; default: the model folder's")
    log_model: bool = Field(False, description="copy the model folder into the MLflow run (else record its path)")
    experiment: str = Field("alps", description="MLflow experiment")
    trust_remote_code: bool = False

    @field_validator("perplexity")
    @classmethod
    def _perplexity(cls, names: list[str]) -> list[str]:
        for name in names:
            if dataset_spec(name).kind is not DatasetKind.TEXT:
                raise ValueError(f"perplexity={name!r} is a zero-shot task, not a text data set")
        return names

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, names: list[str]) -> list[str]:
        return check_task_names(names)

    def report_path(self) -> Path | None:
        """The prune report to log: the one given, else ``prune_report.json`` in a local model folder."""
        if self.prune_report is not None:
            return self.prune_report
        candidate = Path(self.model).expanduser() / PRUNE_REPORT_FILE
        return candidate if candidate.is_file() else None



# These three tasks hand the loaded model to each other in memory, within the flow's process: they are never
# cached or persisted (even with PREFECT_RESULTS_PERSIST_BY_DEFAULT), so a model is never pickled.
@task(name="load-model-for-evaluation", cache_policy=NO_CACHE, persist_result=False)
def load_for_evaluation(config: EvaluateConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """(model, tokenizer, the model's identity) for evaluation."""
    from .models import load_model, resolve_model

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    resolved = resolve_model(config.model)
    model, tokenizer = load_model(resolved, dtype=config.dtype, device=config.device,
                                  trust_remote_code=config.trust_remote_code)
    return model, tokenizer, resolved.to_dict()


@task(name="perplexity", task_run_name="perplexity-{dataset}", cache_policy=NO_CACHE, persist_result=False)
def measure_perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dataset: str,
                       config: EvaluateConfig) -> dict[str, Any]:
    result = evaluate_perplexity(model, tokenizer, dataset, seqlen=config.seqlen, batch_size=config.ppl_batch_size,
                                 max_windows=config.max_windows, data_dir=config.data_dir).to_dict()
    run_logger(logger).info("%s perplexity %.3f (%d windows, %.1f s)", dataset, result["perplexity"], result["windows"],
                result["seconds"])
    return result


@task(name="lm-eval", cache_policy=NO_CACHE, persist_result=False)
def measure_zero_shot(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      config: EvaluateConfig) -> dict[str, Any]:
    result = evaluate_zero_shot(model, tokenizer, config.tasks, data_dir=config.data_dir, limit=config.limit,
                                batch_size=config.batch_size).to_dict()
    run_logger(logger).info("lm-eval: %s (%.1f s)", ", ".join(f"{k} {v:.4f}" for k, v in result["accuracy"].items()),
                result["seconds"])
    return result


@task(name="publish-evaluation")
def publish_evaluation(summary: dict[str, Any], report: dict[str, Any] | None, mlflow_url: str) -> None:
    """Prefect artifacts: a markdown summary, the block errors of the prune report, a link to the MLflow run."""
    lines = [f"# Evaluation of `{summary['model']}`", "", "| measure | value |", "| --- | --- |"]
    lines += [f"| perplexity {name} | {value:.3f} |" for name, value in summary["perplexity"].items()]
    lines += [f"| accuracy {name} | {value:.4f} |" for name, value in summary["accuracy"].items()]
    lines += [f"| seconds | {summary['seconds']:.1f} |", "", f"MLflow run `{summary['run_id']}`: {mlflow_url}"]
    if summary["limit"] is not None:
        lines.append(f"\nlm-eval tasks limited to {summary['limit']} items each (not full-set numbers).")
    create_markdown_artifact("\n".join(lines), key="evaluation-summary", description="perplexity and accuracy")
    if report is not None:
        rows = []
        for block in report["blocks"]:
            errors = [layer["rel_error"] for layer in block["layers"]]
            rows.append({"block": block["index"], "mean_rel_error": round(sum(errors) / len(errors), 6),
                         "max_rel_error": round(max(errors), 6), "seconds": round(block["seconds"], 2)})
        create_table_artifact(rows, key="block-errors", description="relative error per pruned block")
    create_link_artifact(mlflow_url, link_text=f"MLflow run {summary['run_id']}", key="mlflow-run")


register_by_reference(globals())  # Dask/Ray workers import these tasks and flows (see tasks/remote.py)
