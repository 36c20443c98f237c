"""The project's layering, read from the source: library code under tasks/ never imports Prefect or flows, no
module under tasks/ imports flows, and the modules' imports (those inside functions too) form no cycle."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("alps_solver", "tasks", "flows")
PREFECT_LAYER = {"tasks.prune", "tasks.evaluate", "tasks.sweep", "tasks.orchestration", "tasks.local_api"}  # tasks/*.py


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def imported(name: str, path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it, as absolute dotted names (``from a import b`` names both
    ``a`` and ``a.b``: b may be a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def project_imports() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imported(name, path) if m in known and m != name} for name, path in known.items()}


def test_the_library_never_imports_prefect_or_flows():
    offenders = []
    for name, path in modules().items():
        if name.startswith("tasks.") and name not in PREFECT_LAYER:
            offenders += [f"{name}: {m}" for m in imported(name, path) if m.split(".")[0] in ("prefect", "flows")]
    assert offenders == []


def test_the_prefect_layer_is_the_modules_at_the_top_of_tasks():
    top = {module_name(path) for path in (REPO / "tasks").glob("*.py")} - {"tasks"}
    assert top == PREFECT_LAYER


def test_no_module_under_tasks_imports_flows():
    offenders = [f"{name}: {m}" for name, path in modules().items() if name.startswith("tasks")
                 for m in imported(name, path) if m.split(".")[0] == "flows"]
    assert offenders == []


def test_the_project_has_no_import_cycle():
    graph = project_imports()
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(target):] + [target]))
            if target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    graph = project_imports()
    graph["tasks.common.errors"] = graph["tasks.common.errors"] | {"tasks.prune"}  # prune imports errors
    monkeypatch.setattr(sys.modules[__name__], "project_imports", lambda: graph)
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_the_project_has_no_import_cycle()
