"""Structured pruning that shrinks the model: whole MLP neurons and attention heads out, a smaller dense model.

A block's MLP neuron j is column j of the down projection and row j of the gate and up projections; its head h
is columns h*d:(h+1)*d of the attention output projection (d the head size) and the same rows of the query
projection. Zeroing a neuron's or head's columns of the *output* projection (down_proj, o_proj) silences it
exactly, so the pipeline prunes those two layers with a column pattern (ALPS's group projection chooses what
stays and re-solves the kept weights; ``plan_structure`` gives the patterns), runs the blocks as usual, and at
the save drops the silenced columns and the rows that fed them (``shrink_block``): the smaller model computes
what the pruned one did, bit for bit up to the order of sums.

Heads and grouped-query attention: with G key/value heads shared by R = heads / G query heads each, the same
number r of query heads is removed from every group (pattern ``channels:(R-r):Rxd`` on o_proj), so the
query/key-value ratio stays whole and every key/value head keeps serving queries; the key and value
projections stay as they are. Removing whole groups instead would also shrink the key/value cache, but it
cannot apply where there is one key/value head (Gemma 3 270M, multi-query attention) and it removes heads a
group at a time (a quarter of Llama-3-8B's 8 groups, a third of SmolLM2's 3). With multi-head attention (R = 1)
every head is its own group: r heads go across the block, their key and value rows with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from alps_solver import SparsityPattern

from ..common.errors import SettingError
from ..config.structure import Structure
from .adapters import StructureRoles, adapter_for

__all__ = ["BlockStructure", "StructurePlan", "plan_structure", "planned_shape", "shrink_block"]

FIELD = "solver.structured"  # where PruneConfig holds the structure: errors name it


@dataclass(frozen=True)
class StructurePlan:
    """What a structure means for one model: the counts kept, the patterns of the two pruned layers, and the
    config fields of the smaller model."""

    structure: Structure
    roles: StructureRoles
    neurons: int  # MLP neurons per block, before
    kept_neurons: int
    heads: int  # query heads per block, before
    kv_heads: int
    head_dim: int
    kept_heads: int  # query heads per block, after
    kept_kv_heads: int

    @property
    def patterns(self) -> dict[str, SparsityPattern]:
        """The pattern of each layer the pipeline solves (block-relative names); the others are left as they are."""
        patterns = {}
        if self.kept_neurons < self.neurons:
            patterns[self.roles.mlp_output] = SparsityPattern.input_channels(
                (self.neurons - self.kept_neurons) / self.neurons)
        if self.kept_heads < self.heads:
            per_group = self.heads // self.kv_heads
            if per_group == 1:  # multi-head attention: any heads of the block
                patterns[self.roles.attention_output] = SparsityPattern.channel_groups(
                    self.kept_heads, self.heads, self.head_dim)
            else:  # the same number from every key/value group
                patterns[self.roles.attention_output] = SparsityPattern.channel_groups(
                    self.kept_heads // self.kv_heads, per_group, self.head_dim)
        return patterns

    def config_updates(self) -> dict[str, int]:
        """The smaller model's config fields."""
        updates = {self.roles.intermediate_key: self.kept_neurons}
        if self.kept_heads < self.heads:
            updates |= {"num_attention_heads": self.kept_heads, "num_key_value_heads": self.kept_kv_heads,
                        "head_dim": self.head_dim}
        return updates

    def to_json(self) -> dict[str, Any]:
        return {"structure": str(self.structure), "neurons": self.neurons, "kept_neurons": self.kept_neurons,
                "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "kept_heads": self.kept_heads, "kept_kv_heads": self.kept_kv_heads,
                "patterns": {name: str(p) for name, p in self.patterns.items()}}


def plan_structure(config: Any, structure: Structure) -> StructurePlan:
    """The counts and patterns ``structure`` gives for a model with this Hugging Face ``config``. A fraction that
    removes no neuron or head, or all of them, a head count the model's grouping cannot take, and an architecture
    whose MLP or attention layout is unknown are refused (``SettingError`` naming the fix)."""
    roles = adapter_for(config).structure
    if roles is None:
        raise SettingError(FIELD, str(structure), f"model type {config.model_type} has no known MLP and "
                           "attention layout (its adapter names no neuron and head layers)",
                           "prune it with an unstructured or N:M pattern, or add StructureRoles to its adapter in "
                           "tasks/model/adapters.py")
    neurons = int(getattr(config, roles.intermediate_key))
    kept_neurons = neurons
    if structure.mlp:
        removed = round(structure.mlp * neurons)
        if not 0 < removed < neurons:
            raise SettingError(FIELD, str(structure), f"mlp:{structure.mlp} of {neurons} neurons per block "
                               f"removes {removed}", f"give a fraction between {1 / neurons:.2g} and "
                               f"{1 - 1 / neurons:.4g}")
        kept_neurons = neurons - removed
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kept_heads, kept_kv = heads, kv_heads
    if structure.heads:
        if not roles.heads:
            raise SettingError(FIELD, str(structure), f"a {config.model_type} config derives the head size "
                               "from the hidden size, so it cannot state fewer heads at the same width",
                               "remove MLP neurons only (mlp:F)")
        if heads % kv_heads:
            raise SettingError(FIELD, str(structure), f"{heads} query heads do not split into {kv_heads} "
                               "key/value groups", "check the model's config")
        per_group = heads // kv_heads
        if per_group == 1:
            removed = round(structure.heads * heads)
            limit = f"of {heads} heads per block"
            kept_heads = kept_kv = heads - removed
            fix = f"give a fraction between {1 / heads:.2g} and {1 - 1 / heads:.4g}"
        else:
            removed = round(structure.heads * per_group)
            limit = f"of the {per_group} query heads of each of the {kv_heads} key/value groups"
            kept_heads = kv_heads * (per_group - removed)
            fix = (f"heads are removed the same number per group, in steps of 1/{per_group}: give a fraction "
                   f"between {1 / per_group:.2g} and {1 - 1 / per_group:.4g}")
        total = heads if per_group == 1 else per_group
        if not 0 < removed < total:
            raise SettingError(FIELD, str(structure), f"heads:{structure.heads} {limit} removes {removed}",
                               fix)
    return StructurePlan(structure=structure, roles=roles, neurons=neurons, kept_neurons=kept_neurons, heads=heads,
                         kv_heads=kv_heads, head_dim=head_dim, kept_heads=kept_heads, kept_kv_heads=kept_kv)


@dataclass(frozen=True)
class BlockStructure:
    """What one block kept: the indices of its neurons and query heads (and key/value heads), ascending."""

    neurons: list[int]
    heads: list[int]
    kv_heads: list[int]


def shrink_block(tensors: dict[str, torch.Tensor], plan: StructurePlan) -> tuple[dict[str, torch.Tensor],
                                                                                  BlockStructure]:
    """A pruned block's tensors (block-relative names) with the silenced neurons and heads removed.

    What stays is read off the pruned output projections: a neuron stays when its down_proj column has a non-zero
    entry, a head when its o_proj columns do. Where the solver left a kept column all zero (it may), unused
    neurons or heads of lowest index fill the count, so every block has exactly the planned shape; a zero column
    contributes nothing either way.
    """
    roles = plan.roles
    out = dict(tensors)
    neurons = list(range(plan.neurons))
    if plan.kept_neurons < plan.neurons:
        used = tensors[f"{roles.mlp_output}.weight"].ne(0).any(dim=0)  # (neurons,)
        neurons = _fill(used, plan.kept_neurons, block=plan.neurons)
        index = torch.tensor(neurons)
        out[f"{roles.mlp_output}.weight"] = tensors[f"{roles.mlp_output}.weight"][:, index].contiguous()
        for name in roles.mlp_inputs:
            _take_rows(out, tensors, name, index)
    heads, kv_heads = list(range(plan.heads)), list(range(plan.kv_heads))
    if plan.kept_heads < plan.heads:
        d = plan.head_dim
        weight = tensors[f"{roles.attention_output}.weight"]
        used = weight.ne(0).any(dim=0).reshape(plan.heads, d).any(dim=1)  # (heads,)
        per_group = plan.heads // plan.kv_heads
        if per_group == 1:
            heads = kv_heads = _fill(used, plan.kept_heads, block=plan.heads)
        else:
            heads = _fill(used, plan.kept_heads, block=per_group)
        columns = torch.tensor([h * d + i for h in heads for i in range(d)])
        out[f"{roles.attention_output}.weight"] = weight[:, columns].contiguous()
        _take_rows(out, tensors, roles.queries, columns)
        if per_group == 1:
            for name in roles.keys_values:
                _take_rows(out, tensors, name, columns)
    return out, BlockStructure(neurons=neurons, heads=heads, kv_heads=kv_heads)


def _fill(used: torch.Tensor, count: int, *, block: int) -> list[int]:
    """``count`` indices, ascending: in every run of ``block`` consecutive ones, the used ones first, then unused
    ones of lowest index, as many per run as the pattern keeps there."""
    chosen: list[int] = []
    runs = used.numel() // block
    per_run = count // runs
    for run in range(runs):
        members = list(range(run * block, (run + 1) * block))
        kept = [i for i in members if bool(used[i])]
        if len(kept) > per_run:
            raise ValueError(f"the pruned layer uses {len(kept)} of indices {members[0]}..{members[-1]}, more than "
                             f"the {per_run} its pattern keeps: it was not pruned to this structure")
        kept += [i for i in members if not bool(used[i])][: per_run - len(kept)]
        chosen += sorted(kept)
    return chosen


def _take_rows(out: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], layer: str,
               rows: torch.Tensor) -> None:
    for suffix in ("weight", "bias"):
        name = f"{layer}.{suffix}"
        if name in tensors:
            out[name] = tensors[name][rows].contiguous()


def planned_shape(plan: StructurePlan, name: str, shape: list[int]) -> list[int]:
    """The shape block tensor ``name`` (block-relative) has in the smaller model; ``shape`` is its shape before."""
    roles, shape = plan.roles, list(shape)
    layer, _, suffix = name.rpartition(".")
    rows = {roles.mlp_output: None, **{n: plan.kept_neurons for n in roles.mlp_inputs}}
    columns = {roles.mlp_output: plan.kept_neurons}
    if plan.kept_heads < plan.heads:
        rows[roles.queries] = plan.kept_heads * plan.head_dim
        if plan.heads == plan.kv_heads:
            rows |= {n: plan.kept_kv_heads * plan.head_dim for n in roles.keys_values}
        columns[roles.attention_output] = plan.kept_heads * plan.head_dim
    if rows.get(layer) is not None:
        shape[0] = rows[layer]
    if suffix == "weight" and layer in columns:
        shape[1] = columns[layer]
    return shape
