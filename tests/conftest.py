"""Shared test set-up: offline, temporary-folder environment (as in CI) and shared fixtures.

The environment is set at import, before any test module imports transformers, datasets, prefect or
mlflow (they read it at import time). Converted models are cached in ``$ALPS_CACHE_DIR``, by default
``<repo>/.alps_cache``, so the bundled model is converted once per checkout rather than once per run.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_SCRATCH = Path(tempfile.mkdtemp(prefix="alps-tests-"))
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)

for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}.items():
    os.environ[_name] = _value
# One torch thread, also in the subprocesses tests start: on 2 cores shared with a Prefect server, two
# OpenMP threads spin-wait on each other (measured: a 128x128 eigh took 210 ms with 2 threads under load,
# 1.7 ms with 1; a 6-block flow test 198 s against 14 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")
for _name, _folder in {
    "PREFECT_HOME": "prefect",
    "HF_HOME": "huggingface",
    "TMPDIR": "tmp",
}.items():
    (_SCRATCH / _folder).mkdir()
    os.environ[_name] = str(_SCRATCH / _folder)
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SCRATCH / 'mlflow.db'}"
os.environ.setdefault("ALPS_CACHE_DIR", str(REPO / ".alps_cache"))
tempfile.tempdir = None  # recompute from TMPDIR on next use

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedModel  # noqa: E402

TINY_HIDDEN = 64
TINY_VOCAB = 512


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect server and database for the session (about 15 s to start); not autouse."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The local data root: ``$ALPS_DATA_DIR``, else ``../shared/data`` beside the repository."""
    root = Path(os.environ.get("ALPS_DATA_DIR") or REPO.parent / "shared" / "data")
    assert root.is_dir(), f"no local data at {root}: set ALPS_DATA_DIR to a folder laid out like shared/data"
    return root


@pytest.fixture(scope="session")
def tokenizer():
    """The bundled SmolLM2 tokenizer (vocabulary 49152): tiny test models use it for real calibration text."""
    from transformers import AutoTokenizer

    from tasks.model.references import locate_model

    return AutoTokenizer.from_pretrained(locate_model("smollm2-135m").location)


@pytest.fixture(scope="session")
def smollm2() -> tuple[PreTrainedModel, object]:
    """The bundled SmolLM2-135M as (model, tokenizer), float32 on cpu, converted once into the cache."""
    from tasks.model.loading import load_model

    return load_model("smollm2-135m", dtype=torch.float32, device="cpu")


_TINY_ARCHITECTURES: dict[str, tuple[type, type, dict[str, object]]] = {
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,
        {"intermediate_size": 2 * TINY_HIDDEN, "num_key_value_heads": 2, "tie_word_embeddings": False},
    ),
    "opt": (OPTConfig, OPTForCausalLM, {"ffn_dim": 2 * TINY_HIDDEN, "word_embed_proj_dim": TINY_HIDDEN}),
}


def build_tiny_model(
    architecture: str, num_layers: int = 2, vocab_size: int = TINY_VOCAB, seed: int = 0
) -> PreTrainedModel:
    """A random causal LM from a config: hidden size 64, 4 attention heads, 256 positions, eval mode."""
    config_class, model_class, specific = _TINY_ARCHITECTURES[architecture]
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=TINY_HIDDEN,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        **specific,
    )
    torch.manual_seed(seed)
    return model_class(config).eval()


@pytest.fixture
def tiny_llama() -> Callable[..., PreTrainedModel]:
    """Builder of a random LLaMA (2 KV heads, untied embeddings): ``(num_layers=2, vocab_size=512, seed=0)``."""
    return functools.partial(build_tiny_model, "llama")


@pytest.fixture
def tiny_opt() -> Callable[..., PreTrainedModel]:
    """Builder of a random OPT: ``(num_layers=2, vocab_size=512, seed=0)``."""
    return functools.partial(build_tiny_model, "opt")


@pytest.fixture
def closed_port_store(monkeypatch) -> str:
    """``MLFLOW_TRACKING_URI`` at a port nothing listens on (bound, then closed): connections are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def read_only_store_uri(tmp_path_factory) -> str:
    """A SQLite store holding the default experiment, opened through SQLite's own read-only URI (``mode=ro``):
    reads work and every write fails, as for a database on a read-only disk. (Taking write permission away would
    not do: the tests may run as root, whose writes go through anyway.)"""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("read-only-mlflow")
    MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").create_experiment("alps", (folder / "mlruns").as_uri())
    return f"sqlite:///file:{folder / 'mlflow.db'}?mode=ro&uri=true"


@pytest.fixture
def read_only_store(read_only_store_uri, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", read_only_store_uri)
    return read_only_store_uri
