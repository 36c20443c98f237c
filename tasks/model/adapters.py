"""Architecture adapters: one registry from ``config.model_type`` to where the decoder blocks live.

Everything the pipeline needs from an architecture is derived from the adapter and the model's own
classes: the *stem* (embeddings, positions, rotary tables: all that runs before the first block) is the
model built with a single decoder layer, and block ``i`` is a fresh instance of that layer's class with
its tensors read from the checkpoint. The linear layers to prune are the ``nn.Linear`` modules inside a
block; embeddings and ``lm_head`` sit outside the blocks and are never touched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from ..common.errors import ModelReferenceError
from .checkpoint import Checkpoint

__all__ = [
    "ALL_LAYERS", "ArchitectureAdapter", "ADAPTERS", "StructureRoles", "adapter_for", "block_layer_type", "build_stem",
    "build_block", "decoder_layer_class", "layer_kinds", "linear_names",
]


@dataclass(frozen=True)
class StructureRoles:
    """Where a block's MLP neurons and attention heads live, for structured pruning (``tasks.model.structure``).

    A neuron is a column of ``mlp_output`` and the matching rows (and bias entries) of ``mlp_inputs``; a head is
    its ``head_dim`` columns of ``attention_output`` and its rows of ``queries`` (with its key and value rows when
    every head has its own, multi-head attention). ``heads`` is False where the model's config cannot state fewer
    heads at the same width (OPT derives the head size from the hidden size).
    """

    mlp_inputs: tuple[str, ...]
    mlp_output: str
    intermediate_key: str  # the config field counting the neurons
    queries: str = ""
    keys_values: tuple[str, ...] = ()
    attention_output: str = ""
    heads: bool = True


@dataclass(frozen=True)
class ArchitectureAdapter:
    layers_path: str  # attribute path from the CausalLM to its ModuleList of decoder blocks
    structure: StructureRoles | None = None  # None: structured pruning is not known for it

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        module: nn.Module = model
        for part in self.layers_path.split("."):
            module = getattr(module, part)
        return module  # type: ignore[return-value]

    def block_prefix(self, index: int) -> str:
        """Checkpoint name prefix of block ``index``'s tensors."""
        return f"{self.layers_path}.{index}."


_LLAMA_ROLES = StructureRoles(mlp_inputs=("mlp.gate_proj", "mlp.up_proj"), mlp_output="mlp.down_proj",
                              intermediate_key="intermediate_size", queries="self_attn.q_proj",
                              keys_values=("self_attn.k_proj", "self_attn.v_proj"),
                              attention_output="self_attn.o_proj")
_LLAMA_LIKE = ArchitectureAdapter(layers_path="model.layers", structure=_LLAMA_ROLES)
ADAPTERS: dict[str, ArchitectureAdapter] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": ArchitectureAdapter(layers_path="model.layers"),  # fused qkv_proj and gate_up_proj
    "opt": ArchitectureAdapter(layers_path="model.decoder.layers", structure=StructureRoles(
        mlp_inputs=("fc1",), mlp_output="fc2", intermediate_key="ffn_dim", queries="self_attn.q_proj",
        keys_values=("self_attn.k_proj", "self_attn.v_proj"), attention_output="self_attn.out_proj", heads=False)),
}


def adapter_for(config: PretrainedConfig) -> ArchitectureAdapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ModelReferenceError(
            "model_type", model_type, "this architecture has no adapter",
            f"use a model of type {', '.join(sorted(ADAPTERS))}, or add its decoder-layer path to "
            "tasks.model.adapters.ADAPTERS",
        )
    return ADAPTERS[model_type]


ALL_LAYERS = "all"  # the layer type of every block, in models whose blocks are all alike


def layer_kinds(config: PretrainedConfig) -> list[str]:
    """The distinct layer types of the model's blocks, in order of first use (Gemma 2/3: sliding and full
    attention, each with its own mask and rotary table), or [ALL_LAYERS] when every block is alike."""
    types = list(getattr(config, "layer_types", None) or [])[: config.num_hidden_layers]
    kinds = list(dict.fromkeys(types))
    return kinds if len(kinds) > 1 else [ALL_LAYERS]


def block_layer_type(config: PretrainedConfig, index: int) -> str:
    """Which of ``layer_kinds(config)`` block ``index`` is."""
    kinds = layer_kinds(config)
    return config.layer_types[index] if kinds != [ALL_LAYERS] else ALL_LAYERS


def load_config(folder) -> PretrainedConfig:
    return AutoConfig.from_pretrained(folder, trust_remote_code=False)


def build_stem(folder, dtype: torch.dtype, device: torch.device) -> tuple[PreTrainedModel, ArchitectureAdapter]:
    """The model with one decoder layer per layer type (``layer_kinds``) and every non-block tensor loaded
    from the checkpoint.

    Running it computes exactly what the full model feeds its blocks of each type; the layers are
    placeholders that callers replace (they are never loaded).
    """
    config = load_config(folder)
    adapter = adapter_for(config)
    kinds = layer_kinds(config)
    stem_config = copy.deepcopy(config)
    stem_config.num_hidden_layers = len(kinds)
    if getattr(config, "layer_types", None):
        stem_config.layer_types = kinds if kinds != [ALL_LAYERS] else list(config.layer_types[:1])
    stem_config.use_cache = False
    model = AutoModelForCausalLM.from_config(stem_config, dtype=dtype)
    checkpoint = Checkpoint(folder)
    block_names = adapter.layers_path + "."
    outside = [n for n in checkpoint.names if not n.startswith(block_names)]
    state = {n: t.to(dtype) for n, t in checkpoint.tensors(outside).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [n for n in missing if not n.startswith(block_names)]
    tied = _tied_names(model)
    missing = [n for n in missing if n not in tied]
    if missing or unexpected:
        raise ModelReferenceError(
            "model", str(folder), f"checkpoint names do not match {type(model).__name__} "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})",
            "save the model with transformers' save_pretrained so its tensor names are canonical",
        )
    model.tie_weights()
    return model.to(device).eval(), adapter


def build_block(
    folder, index: int, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """Decoder block ``index`` alone, its tensors read from the checkpoint, in ``dtype`` on ``device``."""
    config = load_config(folder)
    adapter = adapter_for(config)
    config.use_cache = False
    layer_class, attention = decoder_layer_class(config)
    # The stem's forward passes attention_mask=None for plain causal attention; the block's attention
    # only reads that as causal under the implementation the full model would pick (e.g. sdpa).
    config._attn_implementation = attention
    block = layer_class(config, layer_idx=index)
    state = {n: t.to(dtype) for n, t in Checkpoint(folder).with_prefix(adapter.block_prefix(index)).items()}
    block.load_state_dict(state, strict=True)
    return block.to(device=device, dtype=dtype).eval()


def linear_names(block: nn.Module) -> list[str]:
    """Names of the prunable linear layers of a block, in module order."""
    return [name for name, module in block.named_modules() if isinstance(module, nn.Linear)]


def decoder_layer_class(config: PretrainedConfig) -> tuple[type[nn.Module], str]:
    """The decoder-layer class and the attention implementation the full model would use."""
    adapter = adapter_for(config)
    probe_config = copy.deepcopy(config)
    probe_config.num_hidden_layers = 1
    with torch.device("meta"):
        probe = AutoModelForCausalLM.from_config(probe_config)
    return type(adapter.layers(probe)[0]), probe.config._attn_implementation


def _tied_names(model: PreTrainedModel) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    output = model.get_output_embeddings()
    return {f"{name}.weight" for name, module in model.named_modules() if module is output}
