"""Zero-shot accuracy with lm-evaluation-harness, offline from the local data root.

Every task is built from lm-eval's own installed task definition (its YAML, includes resolved), so the
prompts (``doc_to_text``), targets, choices, few-shot settings, filters and metrics are lm-eval's, and the
numbers compare with published ones. With a data root only the data source is replaced: ``dataset_path``
becomes ``json`` with ABSOLUTE ``data_files`` (relative ones would resolve against the working directory),
and splits the local data does not have are dropped. Without a data root the definitions are used as they
are (lm-eval's own Hub data sets; needs the network).

The tasks and their local files are listed in ``tasks.evaluation.lm_eval_tasks``.

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
from typing import TYPE_CHECKING, Any

from ..common.errors import SettingError
from ..data.loading import load_examples
from ..data.registry import dataset_spec, resolve_data_root
from .lm_eval_tasks import ZERO_SHOT_TASKS, check_task_names

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["ZeroShotResult", "evaluate_zero_shot", "lm_eval_task_configs", "metric_name"]

logger = logging.getLogger(__name__)

MMLU_SHOTS = 5
_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


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
