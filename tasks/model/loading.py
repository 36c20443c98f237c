"""Loading a model reference as ``(model, tokenizer)`` in a chosen dtype on a chosen device."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..common.errors import SettingError
from .references import ModelSource, hub_error, locate_model

__all__ = ["DTYPES", "load_model", "parse_dtype", "resolve_device"]

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


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
        raise hub_error(source, error) from error
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
