"""The method registry: one ``solve`` entry point for ALPS and every baseline.

Each method module exposes ``Config`` (a frozen, keyword-only dataclass with a ``version`` field) and
``solve(problem, pattern, config=None, *, callback=None, cache=None) -> Result``.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from typing import Any

from .config import config_from_dict
from .problem import GramCache, LayerProblem
from .result import Callback, Result
from .sparsity import PatternKind, SparsityPattern

__all__ = ["METHODS", "solve", "make_config", "method_names", "needs_input_stats", "reads_inputs", "supported_kinds"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    module: str  # module (relative to alps_solver) holding Config and solve
    preset: str | None = None  # name of a Config classmethod giving this method's defaults
    summary: str = ""
    input_stats: bool = False  # reads LayerProblem.input_mean and input_var, not only W and H
    reads_inputs: bool = True  # reads H (or the input statistics): False for magnitude, which sees W alone

    def load(self) -> Any:
        return importlib.import_module(f"alps_solver.{self.module}")


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("alps", "alps", summary="ADMM with adaptive rho + PCG backsolve (Meng et al. 2024)"),
        MethodSpec("alps-simple", "alps", preset="simple", summary="ALPS with looser convergence, faster"),
        MethodSpec("magnitude", "baselines.magnitude", summary="keep the largest |W|", reads_inputs=False),
        MethodSpec("wanda", "baselines.wanda", summary="|W| * ||x||, per output row (Sun et al. 2023)"),
        MethodSpec("wanda-ls", "baselines.wanda", preset="least_squares",
                   summary="Wanda's mask, kept weights re-solved by least squares"),
        MethodSpec("sparsegpt", "baselines.sparsegpt", summary="OBS column sweep (Frantar & Alistarh 2023)"),
        MethodSpec("dsnot", "baselines.dsnot", summary="training-free prune-and-grow (Zhang et al. 2024)",
                   input_stats=True),
        MethodSpec("admm_fixed_mask", "baselines.admm_fixed_mask", summary="gradual ADMM (Boza 2024)"),
        MethodSpec("admm_fixed_rho", "baselines.admm_fixed_rho", summary="ALPS iteration, constant rho"),
    )
}


def method_names() -> list[str]:
    return list(METHODS)


def needs_input_stats(method: str) -> bool:
    """Whether ``method`` reads the per-channel input mean and variance (so callers can skip them)."""
    return _spec(method).input_stats


def reads_inputs(method: str) -> bool:
    """Whether ``method`` reads the calibration inputs (H or their statistics), so can aim at dense targets."""
    return _spec(method).reads_inputs


def supported_kinds(method: str) -> tuple[PatternKind, ...]:
    """The pattern kinds ``method`` can produce (a method module's ``SUPPORTED``; every kind when it has none)."""
    return tuple(getattr(_spec(method).load(), "SUPPORTED", tuple(PatternKind)))


def _spec(method: str) -> MethodSpec:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; choose one of {', '.join(METHODS)}.")
    return METHODS[method]


def make_config(method: str, config: Any = None) -> Any:
    """The method's config: defaults (with its preset), overridden by a dict, or a Config passed through."""
    spec = _spec(method)
    module = spec.load()
    if isinstance(config, module.Config):
        return config
    base = getattr(module.Config, spec.preset)() if spec.preset else module.Config()
    if not config:
        return base
    return config_from_dict(module.Config, _merge(asdict(base), dict(config)))


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` on top of ``base``, nested dicts merged key by key (a preset's other fields stay)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def solve(
    problem: LayerProblem,
    pattern: SparsityPattern | str,
    method: str = "alps",
    config: Any = None,
    *,
    callback: Callback | None = None,
    cache: GramCache | None = None,
) -> Result:
    """Prune one layer with ``method``; see the method's module for its config.

    ``cache``: one ``GramCache`` for the layers that share H (q/k/v, gate/up), solved one after another;
    methods that derive something costly from H alone (ALPS's eigendecomposition, SparseGPT's factor of
    H^-1) then do it once per group. The results are the same as without it.

    A problem with a cross Gram (dense targets) is solved in its reduced form (``LayerProblem.reduced``): the
    result's weights and errors are those of the reduced problem. Magnitude pruning, which never reads the
    inputs, refuses it.
    """
    spec = _spec(method)
    if problem.cross is not None:
        if not spec.reads_inputs:
            raise ValueError(f"{method} ignores the calibration inputs, so it cannot aim at the dense model's "
                             "outputs (a problem with a cross Gram); solve it without cross, or use a method that "
                             "reads H (alps, sparsegpt, wanda, ...).")
        problem = problem.reduced()
    module = spec.load()
    result: Result = module.solve(problem, SparsityPattern.parse(pattern), make_config(method, config),
                                  callback=callback, cache=cache)
    result.method = method
    return result

