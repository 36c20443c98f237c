"""alps_solver is pure math: it imports only torch, numpy and the standard library."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import alps_solver

ALLOWED = {"torch", "numpy"} | set(sys.stdlib_module_names)


def test_solver_imports_only_torch_numpy_and_stdlib():
    package = Path(alps_solver.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] not in ALLOWED]
    assert offenders == []
