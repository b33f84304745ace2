"""Imports point down, read from the source (so a lazy import inside a function counts, and relative imports are
resolved to the module they name):

    vlplan/cli  ->  runner  ->  profiler  ->  planner        tables -> planner

- the planner (pure Python) imports no torch and no stage above it (profiler, runner, tables, the CLI);
- no library module (planner, profiler, runner, tables, vlplan/__init__.py) imports the CLI;
- the profiler does not import the runner: the runner trains the model `profiler/build.py` loads and prepares, so
  the runner may import the profiler, never the other way round;
- the CLI commands do not import one another (each is parse -> one library call -> render; the shared flags and
  renderers are options.py and render.py);
- tables reads the planner only (no torch: the tables are estimates).

The exception is a family's torch parts (planner/families/<family>/batch.py and tiny.py, see
planner/families/__init__.py): leaf modules that the profiler and the runner import by the path the family registry
gives. They may import torch and the profiler; no planner module may import them.
"""

import ast
from pathlib import Path

import pytest

from vlplan.planner.families import FAMILIES, TORCH_PARTS

ROOT = Path(__file__).resolve().parents[1]
# the folders installed as vlplan.<stage> (pyproject.toml package-dir)
PACKAGE_OF = {"planner": "vlplan.planner", "profiler": "vlplan.profiler", "runner": "vlplan.runner",
              "tables": "vlplan.tables", "vlplan": "vlplan"}
FORBIDDEN = {
    # (planner/dataset.py may count tokens with an installed transformers tokenizer: no torch in that)
    "planner": ("vlplan.cli", "vlplan.profiler", "vlplan.runner", "vlplan.tables", "torch"),
    "profiler": ("vlplan.cli", "vlplan.runner", "vlplan.tables"),
    "runner": ("vlplan.cli", "vlplan.tables"),
    "tables": ("vlplan.cli", "vlplan.profiler", "vlplan.runner", "torch"),
}
# The torch leaves, as the registry names them (module path -> file)
TORCH_LEAVES = {path: ROOT / "planner" / Path(*path.split(".")[2:]).with_suffix(".py")
                for family in FAMILIES for part in TORCH_PARTS if (path := family.module(part))}
COMMANDS_SHARED = ("vlplan.cli.options", "vlplan.cli.render", "vlplan.cli.main")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGE_OF[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[str]:
    """Every module `path` imports, relative imports resolved (`from ..planner import x` in tables/ is
    vlplan.planner)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module
            else:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            # `from . import x` / `from vlplan import cli` import submodules too
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def _bad(files, forbidden) -> list[str]:
    return [f"{path.relative_to(ROOT)}: {name}" for path in files for name in imports(path)
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


def test_relative_imports_are_resolved():
    """The reader is the test's instrument: a relative import of the CLI from a library module is caught."""
    assert "vlplan.planner.errors" in imports(ROOT / "tables" / "compute.py")
    assert "vlplan.planner.io.files" in imports(ROOT / "planner" / "io" / "exports.py")
    assert "vlplan.cli.render" in imports(ROOT / "vlplan" / "cli" / "plan.py")


@pytest.mark.parametrize("stage", sorted(FORBIDDEN))
def test_library_imports_point_down(stage):
    leaves = set(TORCH_LEAVES.values())
    files = [path for path in sorted((ROOT / stage).rglob("*.py")) if path not in leaves]
    assert files
    assert not _bad(files, FORBIDDEN[stage])


def test_torch_leaves_are_registered_and_only_they_import_torch():
    """Every batch.py / tiny.py under planner/families is a part the registry names (so the rule above exempts
    exactly the registered leaves), and the leaves still never import the CLI (tiny.py may import the runner, which
    is the only stage that imports it)."""
    on_disk = {path for part in TORCH_PARTS for path in (ROOT / "planner" / "families").glob(f"*/{part}.py")}
    assert on_disk == set(TORCH_LEAVES.values())
    assert not _bad(sorted(on_disk), ("vlplan.cli",))


def test_no_planner_module_imports_a_torch_leaf():
    """Only the profiler and the runner import a family's batch / tiny module (statically, by path)."""
    leaves = set(TORCH_LEAVES.values())
    files = [path for path in sorted((ROOT / "planner").rglob("*.py")) if path not in leaves]
    assert not _bad(files, TORCH_LEAVES)


def test_the_package_root_does_not_import_the_cli():
    assert not _bad([ROOT / "vlplan" / "__init__.py"], ("vlplan.cli",))


def test_commands_do_not_import_each_other():
    commands = [p for p in sorted((ROOT / "vlplan" / "cli").glob("*.py")) if _module_name(p) not in COMMANDS_SHARED
                and p.name != "__init__.py"]
    names = {_module_name(p) for p in commands}
    bad = [f"{p.relative_to(ROOT)}: {name}" for p in commands for name in imports(p)
           if name in names and name != _module_name(p)]
    assert not bad, bad
