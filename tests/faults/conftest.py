"""The fault suite's fixtures: a tiny model, one uninterrupted reference run of it, a folder per test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.flows.test_prune_flow import save_model, tensors_of

from .processes import environment, prune_args, run


@pytest.fixture(scope="session")
def fault_model(tokenizer, tmp_path_factory) -> Path:
    """A 4-block random LLaMA with the bundled tokenizer (hidden 128), saved as a Hugging Face folder."""
    return save_model(tmp_path_factory.mktemp("fault-model") / "model", tokenizer, layers=4, hidden=128,
                      intermediate=256)


@pytest.fixture(scope="session")
def reference(fault_model, tmp_path_factory) -> dict:
    """The pruned tensors of one uninterrupted run, and its wall time."""
    home = tmp_path_factory.mktemp("fault-reference")
    started = time.monotonic()
    code, stderr = run(prune_args(fault_model, home / "out", home / "cache"), environment(home), home / "run")
    assert code == 0, stderr
    return {"tensors": tensors_of(home / "out"), "seconds": time.monotonic() - started}


@pytest.fixture
def home(tmp_path) -> Iterator[Path]:
    (tmp_path / "prefect").mkdir()
    yield tmp_path
