"""The planner stays light: importing it (and the CLI) imports no torch."""

import subprocess
import sys


def test_planner_and_cli_import_no_torch():
    code = ("import sys, vlplan.planner.memory.estimate, vlplan.planner.registry, vlplan.planner.tokens, "
            "vlplan.cli.main; print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
