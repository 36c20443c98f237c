"""ALPS layer solver: pure math on torch tensors (imports only torch, numpy and the standard library).

    from alps_solver import LayerProblem, SparsityPattern, solve
    result = solve(LayerProblem(weight=W, gram=H), SparsityPattern.unstructured(0.7), method="alps")
"""

from .methods import METHODS, make_config, method_names, solve
from .problem import GramCache, LayerProblem, ScaledProblem
from .result import BacksolveRecord, CheckRecord, Result, RhoUpdate, Status
from .sparsity import PatternKind, SparsityPattern

__all__ = [
    "METHODS",
    "BacksolveRecord",
    "CheckRecord",
    "GramCache",
    "LayerProblem",
    "PatternKind",
    "Result",
    "RhoUpdate",
    "ScaledProblem",
    "SparsityPattern",
    "Status",
    "make_config",
    "method_names",
    "solve",
]
