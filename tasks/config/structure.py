"""Structured pruning's spelling: which fraction of every block's MLP neurons and attention heads to remove.

Written like the sparsity patterns (``channels:0.5``): ``mlp:0.3`` removes 30% of each block's MLP neurons,
``heads:0.25`` a quarter of its attention heads, ``mlp:0.3,heads:0.25`` both. What the fractions become for a
given model (whole neurons and heads, the head grouping kept valid) is ``tasks.model.structure.plan_structure``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Structure"]

_PARTS = ("mlp", "heads")


@dataclass(frozen=True)
class Structure:
    """Fractions of each block's MLP neurons (``mlp``) and attention heads (``heads``) to remove, each in [0, 1)."""

    mlp: float = 0.0
    heads: float = 0.0

    def __post_init__(self) -> None:
        for part in _PARTS:
            value = getattr(self, part)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
                raise ValueError(f"{part}:{value!r} is out of range: it is the fraction of each block's "
                                 f"{'MLP neurons' if part == 'mlp' else 'attention heads'} removed, in [0, 1)")
            object.__setattr__(self, part, float(value))
        if self.mlp == 0.0 and self.heads == 0.0:
            raise ValueError("the structure removes nothing: give mlp:F and/or heads:F with a fraction above 0, "
                             "e.g. mlp:0.3,heads:0.25")

    @classmethod
    def parse(cls, text: str | Structure) -> Structure:
        """``"mlp:0.3"``, ``"heads:0.25"`` or ``"mlp:0.3,heads:0.25"``."""
        if isinstance(text, Structure):
            return text
        values: dict[str, float] = {}
        for item in str(text).split(","):
            name, sep, value = (part.strip() for part in item.partition(":"))
            if not sep or name.lower() not in _PARTS:
                raise ValueError(f"structure {text!r}: {item.strip()!r} is not understood; write mlp:F and/or "
                                 "heads:F, comma-separated (e.g. mlp:0.3,heads:0.25)")
            if name.lower() in values:
                raise ValueError(f"structure {text!r} gives {name.lower()} twice; give it once")
            try:
                values[name.lower()] = float(value)
            except ValueError:
                raise ValueError(f"structure {text!r}: {value!r} is not a fraction (e.g. mlp:0.3)") from None
        return cls(**values)

    def __str__(self) -> str:
        return ",".join(f"{part}:{getattr(self, part)!r}" for part in _PARTS if getattr(self, part))
