"""Inputs that are broken from outside the settings, with real processes: a truncated GGUF file, and an MLflow
tracking URI at a port nothing listens on (``--tracking required`` refuses before any work, ``optional`` saves
the model and says tracking failed)."""

from __future__ import annotations

import socket

import pytest

from tasks.model.references import bundled_gguf_path

from .processes import assert_same_tensors, environment, prune_args, run


@pytest.mark.parametrize("kept", [100, 20_000_000], ids=["header", "tensors"])
def test_a_truncated_gguf_is_refused_in_one_line_naming_the_file_and_the_fix(home, kept):
    bundled = bundled_gguf_path("smollm2-135m")
    broken = home / "model.gguf"
    with open(bundled, "rb") as source:
        broken.write_bytes(source.read(kept))  # as a download or copy that stopped
    code, stderr = run(prune_args(broken, home / "out", home / "cache"), environment(home), home / "truncated")
    assert code == 2, stderr
    assert f"--model='{broken}'" in stderr and "incomplete or damaged" in stderr and "download or copy it" in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (home / "out").exists() and not (home / "cache").exists()


def _closed_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_required_tracking_at_a_closed_port_is_refused_before_any_work(fault_model, home):
    uri = _closed_port()
    env = environment(home) | {"MLFLOW_TRACKING_URI": uri}
    code, stderr = run(prune_args(fault_model, home / "out", home / "cache"), env, home / "required")
    assert code == 2, stderr
    assert uri in stderr and "connection refused" in stderr and "--tracking optional" in stderr
    assert "Traceback" not in stderr
    assert not (home / "out").exists() and not (home / "cache" / "blocks").exists()


def test_optional_tracking_at_a_closed_port_saves_the_model_and_says_tracking_failed(fault_model, reference, home):
    uri = _closed_port()
    env = environment(home) | {"MLFLOW_TRACKING_URI": uri}
    code, stderr = run(prune_args(fault_model, home / "out", home / "cache", "--tracking", "optional"), env,
                       home / "optional")
    assert code == 0, stderr
    assert uri in stderr and "not tracked" in stderr.lower(), stderr
    assert "Traceback" not in stderr
    assert_same_tensors(home / "out", reference)
    assert (home / "out" / "prune_report.json").is_file(), "the run's record is kept in the pruned folder"
