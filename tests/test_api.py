"""The public API: `from vlplan import resolve_setup, estimate, plan, trace, profile, run, scan` gives the library's
own functions (the ones the CLI commands call), imported on first use so that `import vlplan` stays torch-free."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import vlplan

ROOT = Path(__file__).resolve().parents[1]
HOMES = {
    "resolve_setup": "vlplan.planner.resolve:resolve_setup",
    "estimate": "vlplan.planner.memory.estimate:estimate",
    "plan": "vlplan.planner.plan:plan",
    "scan": "vlplan.planner.dataset:scan_dataset",
    "trace": "vlplan.profiler.trace:trace",
    "profile": "vlplan.profiler.profile:profile",
    "run": "vlplan.runner.launch:run",
    "TrainSetup": "vlplan.planner.setup:TrainSetup",
    "RunOptions": "vlplan.runner.job:RunOptions",
    "VlplanError": "vlplan.planner.errors:VlplanError",
    "ProfileOptions": "vlplan.profiler.profile:ProfileOptions",
}
FUNCTIONS = ("resolve_setup", "estimate", "plan", "trace", "profile", "run", "scan")


@pytest.mark.parametrize("name", ["resolve_setup", "estimate", "plan", "scan", "TrainSetup", "RunOptions",
                                  "VlplanError"])
def test_planner_names_are_the_library_functions(name):
    module, attribute = HOMES[name].split(":")
    assert getattr(vlplan, name) is getattr(importlib.import_module(module), attribute)
    assert name in vlplan.__all__ and name in dir(vlplan)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["trace", "profile", "run", "ProfileOptions"])
def test_torch_stage_names_are_the_library_functions(name):
    pytest.importorskip("torch")
    module, attribute = HOMES[name].split(":")
    assert getattr(vlplan, name) is getattr(importlib.import_module(module), attribute)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'estimat'"):
        vlplan.estimat  # noqa: B018
    with pytest.raises(ImportError):
        exec("from vlplan import estimat", {})


def test_import_and_estimate_import_no_torch():
    code = ("import sys, vlplan\n"
            "assert not {'torch', 'transformers'} & set(sys.modules), 'import vlplan'\n"
            "from vlplan import estimate, resolve_setup\n"
            "result = estimate(resolve_setup(model='qwen2-vl-2b').setup)\n"
            "assert result.peak_bytes > 0\n"
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_cli_commands_call_the_public_functions():
    """A command imports a stage's entry function from `vlplan` (the public API), never from the module behind it:
    what the CLI runs is what a Python user runs."""
    homes = {tuple(HOMES[name].split(":")) for name in FUNCTIONS}
    bad = []
    for path in sorted((ROOT / "vlplan" / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                bad += [f"{path.name}: from {node.module} import {alias.name}" for alias in node.names
                        if (node.module, alias.name) in homes]
    assert not bad, bad
