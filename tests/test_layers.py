"""Imports point down: no library module (planner, profiler, runner, tables) imports the CLI, and the planner
imports neither torch nor the stages above it. Read from the source, so a lazy import inside a function counts.

The exception is a family's torch parts (planner/families/<family>/batch.py and tiny.py, see
planner/families/__init__.py): leaf modules that the profiler and the runner import by the path the family registry
gives. They may import torch and the profiler; no planner module may import them."""

import ast
from pathlib import Path

import pytest

from vlplan.planner.families import FAMILIES, TORCH_PARTS

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "planner": ("vlplan.cli", "vlplan.profiler", "vlplan.runner", "vlplan.tables", "torch"),
    "profiler": ("vlplan.cli",),
    "runner": ("vlplan.cli",),
    "tables": ("vlplan.cli",),
}
# The torch leaves, as the registry names them (module path -> file)
TORCH_LEAVES = {path: ROOT / "planner" / Path(*path.split(".")[2:]).with_suffix(".py")
                for family in FAMILIES for part in TORCH_PARTS if (path := family.module(part))}


def _package(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("vlplan",) + parts[:-1]) if parts[0] != "vlplan" else ".".join(parts[:-1])


def _imports(path: Path) -> list[str]:
    """Absolute module names `path` imports; relative imports resolved against its package (planner files only
    live under vlplan.planner), with `from . import x` counted as the module `.x`."""
    names = []
    package = _package(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def _is(name: str, prefixes) -> bool:
    return any(name == f or name.startswith(f + ".") for f in prefixes)


@pytest.mark.parametrize("stage", sorted(FORBIDDEN))
def test_library_imports_point_down(stage):
    leaves = set(TORCH_LEAVES.values())
    bad = [f"{path.relative_to(ROOT)}: {name}" for path in sorted((ROOT / stage).rglob("*.py")) if path not in leaves
           for name in _imports(path) if _is(name, FORBIDDEN[stage])]
    assert not bad, bad


def test_torch_leaves_are_registered_and_only_they_import_torch():
    """Every batch.py / tiny.py under planner/families is a part the registry names (so the rule above exempts
    exactly the registered leaves), and the leaves still never import the CLI."""
    on_disk = {path for part in TORCH_PARTS for path in (ROOT / "planner" / "families").glob(f"*/{part}.py")}
    assert on_disk == set(TORCH_LEAVES.values())
    bad = [f"{path.relative_to(ROOT)}: {name}" for path in sorted(on_disk) for name in _imports(path)
           if _is(name, ("vlplan.cli",))]
    assert not bad, bad


def test_no_planner_module_imports_a_torch_leaf():
    """Only the profiler and the runner import a family's batch / tiny module (statically, by path)."""
    leaves = set(TORCH_LEAVES.values())
    bad = [f"{path.relative_to(ROOT)}: {name}" for path in sorted((ROOT / "planner").rglob("*.py"))
           if path not in leaves for name in _imports(path) if _is(name, TORCH_LEAVES)]
    assert not bad, bad
