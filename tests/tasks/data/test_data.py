"""Data sets: local loaders and their counts, calibration sampling, and the errors users can fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.common.errors import DataError, HubUnavailableError, SettingError
from tasks.data.loading import describe_datasets, load_examples, load_texts
from tasks.data.registry import DATA_DIR_ENV, dataset_spec, resolve_data_root
from tasks.data.sampling import calibration_windows, check_calibration_size


@pytest.mark.parametrize(
    ("name", "split", "count"),
    [("wikitext2", "test", 4358), ("wikitext2", "train", 1018), ("ptb", "test", 3761), ("c4", "validation", 2000)],
)
def test_text_loader_counts(data_dir: Path, name: str, split: str, count: int) -> None:
    rows = load_texts(name, split, data_dir)
    assert len(rows) == count
    assert all(isinstance(row, str) for row in rows)


@pytest.mark.parametrize(
    ("name", "count", "keys"),
    [
        ("lambada", 5153, {"text"}),
        ("piqa", 1838, {"goal", "sol1", "sol2", "label"}),
        ("arc_easy", 2376, {"id", "question", "choices", "answerKey"}),
        ("arc_challenge", 1172, {"id", "question", "choices", "answerKey"}),
        ("mmlu", 14042, {"subject", "question", "choices", "answer"}),
        ("gsm8k", 1319, {"question", "answer"}),
    ],
)
def test_zero_shot_loader_counts(data_dir: Path, name: str, count: int, keys: set[str]) -> None:
    examples = load_examples(name, data_dir=data_dir)
    assert len(examples) == count
    assert all(set(example) == keys for example in examples)


def test_mmlu_covers_57_subjects(data_dir: Path) -> None:
    assert len({example["subject"] for example in load_examples("mmlu", data_dir=data_dir)}) == 57
    assert len(load_examples("mmlu", "dev", data_dir)) == 285


def test_wikitext_rows_rebuild_the_hub_layout(data_dir: Path) -> None:
    rows = load_texts("wikitext2", "test", data_dir)
    assert rows[:3] == ["", " = Robert Boulter = \n", ""]
    assert sum(row == "" for row in rows) == 1467
    assert all(row.endswith("\n") for row in rows if row)
    # Rows keep every non-blank line of the raw file, in order.
    raw_lines = (data_dir / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").splitlines()
    assert [row[:-1] for row in rows if row] == [line for line in raw_lines if line.strip()]


def test_ptb_rows_are_stripped_sentences(data_dir: Path) -> None:
    rows = load_texts("ptb", "test", data_dir)
    assert rows[0] == "no it was n't black monday"
    assert all(row == row.strip() for row in rows)


def test_pydoc_parts_are_disjoint_and_cover_the_topics() -> None:
    from pydoc_data.topics import topics

    calibration, evaluation = load_texts("pydoc", "train"), load_texts("pydoc", "test")
    assert not set(calibration) & set(evaluation)
    assert sorted(calibration + evaluation) == sorted(topics.values())
    share = sum(map(len, evaluation)) / sum(map(len, topics.values()))
    assert 0.10 <= share < 0.25


def test_calibration_is_deterministic_for_a_seed(smollm2, data_dir: Path) -> None:
    _, tokenizer = smollm2
    first = calibration_windows("wikitext2", tokenizer, nsamples=4, seqlen=64, seed=3, data_dir=data_dir)
    again = calibration_windows("wikitext2", tokenizer, nsamples=4, seqlen=64, seed=3, data_dir=data_dir)
    other = calibration_windows("wikitext2", tokenizer, nsamples=4, seqlen=64, seed=4, data_dir=data_dir)
    assert first.shape == (4, 64) and first.dtype == torch.long
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize(("name", "evaluation_split"), [("wikitext2", "test"), ("c4", "validation"), ("pydoc", "test")])
def test_calibration_comes_from_training_text_only(smollm2, data_dir: Path, name: str, evaluation_split: str) -> None:
    _, tokenizer = smollm2
    windows = calibration_windows(name, tokenizer, nsamples=8, seqlen=96, seed=0, data_dir=data_dir)
    joiner = dataset_spec(name).joiner
    training = joiner.join(load_texts(name, "train", data_dir))
    evaluation = joiner.join(load_texts(name, evaluation_split, data_dir))
    for window in windows:
        # Inner tokens decode to an exact substring of the source (byte-level BPE); 64 tokens are unique text.
        snippet = tokenizer.decode(window[16:80])
        assert snippet in training
        assert snippet not in evaluation


def test_c4_calibration_windows_come_from_long_documents(smollm2, data_dir: Path) -> None:
    _, tokenizer = smollm2
    windows = calibration_windows("c4", tokenizer, nsamples=6, seqlen=1024, seed=0, data_dir=data_dir)
    documents = load_texts("c4", "train", data_dir)
    for window in windows:
        snippet = tokenizer.decode(window[8:-8])
        assert any(snippet in document for document in documents)


def test_ptb_calibration_needs_the_training_split(smollm2, data_dir: Path) -> None:
    _, tokenizer = smollm2
    with pytest.raises(DataError) as caught:
        calibration_windows("ptb", tokenizer, nsamples=1, seqlen=64, data_dir=data_dir)
    message = str(caught.value)
    assert "ptb.train.txt" in message and "training split" in message and "Fix:" in message


@pytest.mark.parametrize(("nsamples", "seqlen", "field"), [(0, 64, "nsamples"), (4, 1, "seqlen")])
def test_calibration_rejects_bad_sizes(smollm2, data_dir: Path, nsamples: int, seqlen: int, field: str) -> None:
    _, tokenizer = smollm2
    with pytest.raises(SettingError, match=f"^{field}={nsamples if field == 'nsamples' else seqlen}:.*Fix:"):
        calibration_windows("wikitext2", tokenizer, nsamples=nsamples, seqlen=seqlen, data_dir=data_dir)


def test_calibration_refuses_more_windows_than_its_text_holds(tokenizer) -> None:
    text = "\n\n".join(load_texts("pydoc", "train"))  # this Python's documentation: its length varies
    holds = (len(tokenizer(text, verbose=False)["input_ids"]) - 1) // 2048  # windows that do not overlap
    with pytest.raises(SettingError, match=f"^nsamples={holds + 1}: pydoc's training text holds {holds} windows of "
                       f"2048 tokens.*Fix: use --nsamples {holds} or fewer"):
        calibration_windows("pydoc", tokenizer, nsamples=holds + 1, seqlen=2048)
    check_calibration_size("pydoc", tokenizer, nsamples=holds, seqlen=2048)  # the same count, checked before a run
    with pytest.raises(SettingError, match=f"^nsamples={holds + 1}:"):
        check_calibration_size("pydoc", tokenizer, nsamples=holds + 1, seqlen=2048)


def test_calibration_rejects_windows_longer_than_any_document(smollm2, data_dir: Path) -> None:
    _, tokenizer = smollm2
    with pytest.raises(SettingError, match="no document has 100001 tokens.*lower --seqlen"):
        calibration_windows("c4", tokenizer, nsamples=1, seqlen=100_000, data_dir=data_dir)


def test_missing_data_root_names_the_path_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"--data-dir='{missing}'.*does not exist.*Fix:.*{DATA_DIR_ENV}"):
        resolve_data_root(missing)
    monkeypatch.setenv(DATA_DIR_ENV, str(missing))
    with pytest.raises(DataError, match=f"^{DATA_DIR_ENV}='{missing}'.*does not exist"):
        load_texts("wikitext2")


def test_missing_data_file_names_the_path_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_examples("gsm8k", data_dir=tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "gsm8k" / "test.jsonl") in message
    assert "put gsm8k/test.jsonl under the data root" in message and "openai/gsm8k" in message


def test_broken_json_line_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"test.jsonl:2'.*not valid JSON"):
        load_examples("gsm8k", data_dir=tmp_path)


def test_hub_unreachable_says_to_set_a_data_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(HubUnavailableError) as caught:
        load_texts("wikitext2")
    message = str(caught.value)
    assert "hub wikitext (wikitext-2-raw-v1)" in message
    assert f"set {DATA_DIR_ENV} or pass --data-dir" in message


def test_unknown_dataset_lists_the_known_ones() -> None:
    with pytest.raises(DataError, match="dataset='wikitext3': unknown data set.*wikitext2, ptb, c4, pydoc, lambada"):
        load_texts("wikitext3")


def test_describe_counts_local_files_and_never_contacts_the_hub(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = {(row["dataset"], row["split"]): row for row in describe_datasets(data_dir)}
    assert rows["mmlu", "test"]["count"] == 14042
    assert rows["ptb", "train"]["status"] == "missing"
    assert rows["c4", "train"]["use"] == "calibration"
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    hub_rows = describe_datasets()
    assert {row["status"] for row in hub_rows} == {"hub", "built-in"}


def test_calibration_text_hash_follows_the_text_not_the_path(data_dir, tmp_path):
    from tasks.data.sampling import calibration_text_hash

    local = calibration_text_hash("wikitext2", data_dir)
    assert calibration_text_hash("wikitext2", str(data_dir) + "/.") == local  # same text, other spelling
    copy = tmp_path / "wikitext2"
    copy.mkdir()
    source = (data_dir / "wikitext2" / "wiki.train.prefix-1018lines.raw").read_text()
    (copy / "wiki.train.prefix-1018lines.raw").write_text(source.replace("Valkyria", "Valkyrie"))
    assert calibration_text_hash("wikitext2", tmp_path) != local  # changed text, new key
    assert calibration_text_hash("pydoc") != local
