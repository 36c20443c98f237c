"""The shapes a run's resources follow, read from a model's config alone (no weights are loaded).

A decoder block and the stem are instantiated on torch's meta device, so a bare ``config.json`` (for example
Llama-3.1-70B's) is enough: every prunable linear layer's (d_out, d_in), the parameters of a block and of the
stem, and the groups of layers that share one H. Groups are named as the pipeline finds them by running a block
(layers reading the same input tensor): consecutive linears of one module with the same input width, except
the output projections, which read their own input.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..common.errors import ModelReferenceError
from ..model.adapters import adapter_for, decoder_layer_class, layer_kinds

__all__ = ["LinearShape", "ModelShape", "load_model_config", "model_shape"]

# Linear layers that read the output of what came before them in their module, never a shared input.
_OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "down_proj", "fc2", "dense", "dense_4h_to_h", "c_proj", "wo")


@dataclass(frozen=True)
class LinearShape:
    name: str  # inside a block, e.g. self_attn.q_proj
    d_out: int
    d_in: int
    group: str  # the first layer of the group sharing its H


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    layers: int
    hidden: int
    attention_width: int  # query heads x head dim: the width attention scores are taken over
    kinds: int  # layer types (Gemma 2/3: 2), each with its own keywords and a placeholder block in the stem
    linears: tuple[LinearShape, ...]  # one block's prunable layers, in module order
    block_params: int  # every parameter of one block (linears, norms)
    stem_params: int  # everything outside the blocks: embeddings, final norm, untied lm_head
    checkpoint_bytes: int  # bytes per parameter as stored (2 for bf16/fp16, 4 for float32)
    max_positions: int  # 0 when the config does not say
    largest_file: int = 0  # bytes of the checkpoint's largest weight file; 0: unknown (a bare config)

    @property
    def groups(self) -> dict[str, int]:
        """Each group's H width, by the group's first layer."""
        return {layer.group: layer.d_in for layer in self.linears}

    @property
    def linear_params(self) -> int:
        return sum(layer.d_out * layer.d_in for layer in self.linears)

    @property
    def model_bytes(self) -> int:
        """The checkpoint's size: what the pruned model's folder takes."""
        return (self.layers * self.block_params + self.stem_params) * self.checkpoint_bytes

    @property
    def shard_bytes(self) -> int:
        """The largest weight file, or for a bare config the hub's usual 5 GB shards (or the whole model)."""
        return self.largest_file or min(self.model_bytes, 5 * 10**9)


def load_model_config(location: Path) -> PretrainedConfig:
    """The config of a model folder, or of a bare ``config.json`` file."""
    location = Path(location)
    if location.is_file():
        try:
            values = json.loads(location.read_text())
            model_type = values.pop("model_type")
        except (json.JSONDecodeError, KeyError) as error:
            raise ModelReferenceError("model", str(location), f"not a transformers config.json ({error})",
                                      "give a model's config.json, which names its model_type") from error
        return AutoConfig.for_model(model_type, **values)
    return AutoConfig.from_pretrained(location)


def model_shape(config: PretrainedConfig, checkpoint_dtype: torch.dtype | None = None) -> ModelShape:
    """The shapes of ``config``'s model; ``checkpoint_dtype`` defaults to the config's own dtype."""
    adapter = adapter_for(config)
    layer_class, _ = decoder_layer_class(config)
    with torch.device("meta"):
        block = layer_class(copy.deepcopy(config), layer_idx=0)
        stem_config = copy.deepcopy(config)
        stem_config.num_hidden_layers = 1
        if getattr(config, "layer_types", None):
            stem_config.layer_types = list(config.layer_types[:1])
        stem = AutoModelForCausalLM.from_config(stem_config)
    block_params = sum(p.numel() for p in block.parameters())
    stem_params = sum(p.numel() for p in stem.parameters()) - sum(
        p.numel() for p in adapter.layers(stem)[0].parameters())
    linears: list[LinearShape] = []
    previous: tuple[str, int] | None = None  # (parent module, d_in) of the layer before
    for name, module in block.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        parent, _, leaf = name.rpartition(".")
        shares = previous == (parent, module.in_features) and leaf not in _OUTPUT_PROJECTIONS
        group = linears[-1].group if shares else name
        linears.append(LinearShape(name, module.out_features, module.in_features, group))
        previous = (parent, module.in_features)
    dtype = checkpoint_dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    head_dim = int(getattr(config, "head_dim", 0) or (config.hidden_size // heads if heads else 0))
    return ModelShape(
        model_type=config.model_type,
        layers=int(config.num_hidden_layers),
        hidden=int(config.hidden_size),
        attention_width=heads * head_dim,
        kinds=len(layer_kinds(config)),
        linears=tuple(linears),
        block_params=int(block_params),
        stem_params=int(stem_params),
        checkpoint_bytes=dtype.itemsize,
        max_positions=int(getattr(config, "max_position_embeddings", 0) or 0),
    )
