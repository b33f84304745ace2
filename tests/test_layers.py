"""Imports point down: no library module (planner, profiler, runner, tables) imports the CLI, and the planner
imports neither torch nor the stages above it. Read from the source, so a lazy import inside a function counts."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "planner": ("vlplan.cli", "vlplan.profiler", "vlplan.runner", "vlplan.tables", "torch"),
    "profiler": ("vlplan.cli",),
    "runner": ("vlplan.cli",),
    "tables": ("vlplan.cli",),
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("stage", sorted(FORBIDDEN))
def test_library_imports_point_down(stage):
    bad = [f"{path.relative_to(ROOT)}: {name}" for path in sorted((ROOT / stage).rglob("*.py"))
           for name in _imports(path)
           if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[stage])]
    assert not bad, bad
