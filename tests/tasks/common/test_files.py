"""Atomic writes: readers see the old content or the new one, never a partial one; no temporary files stay."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.common.files import atomic_directory, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "result.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_text(target, "second\n")
    assert target.read_text() == "second\n"
    assert [path.name for path in target.parent.iterdir()] == ["result.json"]


def test_failed_directory_write_leaves_nothing(tmp_path: Path) -> None:
    destination = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_directory(destination) as temporary:
            (temporary / "weights.bin").write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_directory_written_first_by_another_process_wins(tmp_path: Path) -> None:
    destination = tmp_path / "model"
    with atomic_directory(destination) as temporary:
        (temporary / "mine.txt").write_text("mine")
        destination.mkdir()
        (destination / "theirs.txt").write_text("theirs")
    assert [path.name for path in tmp_path.iterdir()] == ["model"]
    assert [path.name for path in destination.iterdir()] == ["theirs.txt"]
