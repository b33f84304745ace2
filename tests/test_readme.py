"""The README's quick start runs as written, line by line, as a newcomer would paste it from a fresh clone.

Each `vlplan ...` line of the "Quick start" code block runs in a temporary folder that holds a copy of the
repository's `examples/` (the only files the lines may read; everything they write lands there too, so nothing is
left in the repository), and must exit 0 without a traceback. Lines run in README order within one folder, so a line
can use what an earlier one wrote (`tiny/` from `vlplan tiny-model`); run on its own, a line first runs the earlier
line that writes the path it needs. The lines that load torch and build, trace or train a model (`trace`,
`tiny-model`, `run`) and the searches over many setups (`plan`, `tables`) are marked slow and run through the
installed `vlplan` script in a subprocess; the other lines run in this process through the same typer app (a
subprocess costs ~2 s of CPU on the shared 2-core machine). `vlplan profile` needs a CUDA GPU and is skipped without
one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import traceback
from itertools import pairwise
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
COPIED = ("examples",)  # the repository files the quick start may read

# Commands that take more than a few seconds on 2 CPU cores (measured on an idle machine: trace 10-20 s, tiny-model
# ~10 s, a 5-step run of the tiny model ~35 s, a --dry-run ~10 s, each importing torch and transformers and building a
# model; tables 3.5 s; the plan lines' searches 2.2 s and 5.5 s of CPU)
SLOW_COMMANDS = {"trace", "tiny-model", "run", "tables", "plan"}
GPU_COMMANDS = {"profile"}
OUTPUT_OPTIONS = {"--output-dir", "-o", "--export-llamafactory", "--export-deepspeed", "--plot", "--out"}
TIMEOUT_S = 600  # per line; the slowest measured is ~35 s, so only a hang reaches it


def quick_start_lines(text: str) -> list[str]:
    """The shell lines of the first code block under the "## Quick start" heading, continuations joined and
    comments dropped."""
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.DOTALL | re.MULTILINE)
    assert section, "README.md has no '## Quick start' section"
    block = re.search(r"^```[a-z]*\n(.*?)^```", section.group(1), re.DOTALL | re.MULTILINE)
    assert block, "the Quick start section has no code block"
    lines, pending = [], ""
    for raw in block.group(1).splitlines():
        pending += raw.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            lines.append(shlex.join(shlex.split(pending, comments=True)))
        pending = ""
    assert not pending, "the quick start ends with a line continuation"
    return lines


LINES = quick_start_lines(README.read_text(encoding="utf-8"))


def written_paths(line: str) -> set[str]:
    """The paths a quick-start line writes: its output options' values, and tiny-model's folder argument."""
    words = shlex.split(line)
    paths = {value for option, value in pairwise(words) if option in OUTPUT_OPTIONS}
    if words[1:2] == ["tiny-model"] and not words[-1].startswith("-"):
        paths.add(words[-1])
    return paths


def _params():
    for index, line in enumerate(LINES):
        words = shlex.split(line)
        command = words[1] if len(words) > 1 else ""
        marks = []
        if command in GPU_COMMANDS:
            marks.append(pytest.mark.gpu)  # skipped without a CUDA GPU (conftest.py)
        if command in SLOW_COMMANDS:
            marks.append(pytest.mark.slow)
        yield pytest.param(index, id=f"{index:02d}-{command}", marks=marks)


def _vlplan() -> list[str]:
    """The installed `vlplan` script beside this Python (what the README's lines call), else the module."""
    script = Path(sys.executable).with_name("vlplan")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vlplan.cli.main"]


class QuickStart:
    """One folder for the whole quick start; each line runs at most once, its result kept."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.results: dict[int, subprocess.CompletedProcess] = {}
        for name in COPIED:
            shutil.copytree(REPO / name, folder / name)
        # No line may compile into or wait on a shared cache (DeepSpeed's C++ ops go to TORCH_EXTENSIONS_DIR)
        self.env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(folder.parent / "torch_extensions"),
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "120"}

    def run(self, index: int) -> subprocess.CompletedProcess:
        if index in self.results:
            return self.results[index]
        words = shlex.split(LINES[index])
        reads = set(words) - written_paths(LINES[index])
        for earlier in range(index):  # first the earlier lines that write a path this line reads
            if earlier not in self.results and written_paths(LINES[earlier]) & reads:
                done = self.run(earlier)
                assert done.returncode == 0, f"`{LINES[earlier]}`, which writes what this line reads, failed"
        assert words[0] == "vlplan", f"a quick-start line that is not a vlplan command: {LINES[index]}"
        if words[1] in SLOW_COMMANDS | GPU_COMMANDS:  # end to end: the installed script, its own process
            result = subprocess.run(_vlplan() + words[1:], cwd=self.folder, env=self.env, capture_output=True,
                                    text=True, timeout=TIMEOUT_S, check=False)
        else:
            result = self._in_process(words[1:])
        self.results[index] = result
        return result

    def _in_process(self, args: list[str]) -> subprocess.CompletedProcess:
        from typer.testing import CliRunner

        from vlplan.cli.main import app

        before = os.getcwd()
        os.chdir(self.folder)
        try:
            result = CliRunner().invoke(app, args, env=self.env)
        finally:
            os.chdir(before)
        stderr = result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            stderr += "".join(traceback.format_exception(result.exception))
        return subprocess.CompletedProcess(["vlplan", *args], result.exit_code, result.stdout, stderr)


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory) -> QuickStart:
    return QuickStart(tmp_path_factory.mktemp("readme") / "clone")


def test_quick_start_is_vlplan_lines_over_shipped_files():
    """The block holds only vlplan commands, and every input file it names ships in examples/."""
    assert len(LINES) >= 10
    for line in LINES:
        assert shlex.split(line)[0] == "vlplan", line
    named = {word for line in LINES for word in shlex.split(line) if word.startswith("examples/")}
    assert named, "the quick start uses none of the shipped examples"
    for path in named:
        assert (REPO / path).exists(), f"the quick start names {path}, which is not in the repository"


def test_example_dataset_is_what_llamafactory_reads():
    """examples/data: a dataset_info.json whose sharegpt entries name files that exist, with one image per
    <image> placeholder and every image on disk (LLaMA-Factory's data/README.md rules)."""
    data_dir = REPO / "examples" / "data"
    info = json.loads((data_dir / "dataset_info.json").read_text())
    assert info
    for name, entry in info.items():
        assert entry["formatting"] == "sharegpt", name
        records = json.loads((data_dir / entry["file_name"]).read_text())
        assert isinstance(records, list) and records, name
        messages, images = entry["columns"]["messages"], entry["columns"]["images"]
        for record in records:
            text = "".join(turn["value"] for turn in record[messages])
            assert text.count("<image>") == len(record[images]), record
            for image in record[images]:
                assert (data_dir / image).is_file(), image
                assert (data_dir / image).stat().st_size < 16 * 1024, f"{image}: keep example images tiny"


# LLaMA-Factory's own parser (`get_train_args`, what `llamafactory-cli train` calls first) on the example YAML, run
# from the repository root as the README says; see tests/test_llamafactory_parser.py for the install
PARSE = """
import json, sys, yaml
from llamafactory.hparams import get_train_args
config = yaml.safe_load(open(sys.argv[1]))
config["use_cpu"] = True  # transformers refuses bf16 without a GPU ("Your setup doesn't support bf16/gpu")
model, data, training, finetuning, _ = get_train_args(config)
print(json.dumps({"model": model.model_name_or_path, "dataset": data.dataset, "dataset_dir": data.dataset_dir,
                  "finetuning_type": finetuning.finetuning_type, "output_dir": training.output_dir}))
"""


@pytest.mark.slow
def test_llamafactory_accepts_the_example_yaml(tmp_path):
    pytest.importorskip("llamafactory")
    pytest.importorskip("omegaconf")
    example = yaml.safe_load((REPO / "examples" / "train_lora.yaml").read_text())
    info = json.loads((REPO / example["dataset_dir"] / "dataset_info.json").read_text())
    assert set(example["dataset"].split(",")) <= set(info), "the YAML's dataset is not in its dataset_info.json"
    env = {**os.environ, "DISABLE_VERSION_CHECK": "1", "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}
    done = subprocess.run([sys.executable, "-c", PARSE, str(REPO / "examples" / "train_lora.yaml")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = json.loads(done.stdout.strip().splitlines()[-1])
    assert parsed == {"model": example["model_name_or_path"], "dataset": ["vlplan_demo"],
                      "dataset_dir": "examples/data", "finetuning_type": "lora",
                      "output_dir": example["output_dir"]}


@pytest.mark.parametrize("index", list(_params()))
def test_quick_start_line_runs_as_written(quick_start, index):
    result = quick_start.run(index)
    assert result.returncode == 0, (f"`{LINES[index]}` exited {result.returncode}\n"
                                    f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-3000:]}")
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_ci_runs_the_readme_test_command():
    """.ci/run calls the README's test command as written, so what CI checks is what a newcomer runs."""
    commands = [line for line in README.read_text().splitlines()
                if line.startswith("python3 -m venv .venv") and line.endswith("python -m pytest")]
    assert len(commands) == 1, commands
    assert commands[0] in (REPO / ".ci" / "run").read_text().splitlines()


def python_api_example(text: str) -> str:
    """The Python code block of the README's "## Python API" section."""
    section = re.search(r"^## Python API\n(.*?)(?=^## )", text, re.DOTALL | re.MULTILINE)
    assert section, "README.md has no '## Python API' section"
    block = re.search(r"^```python\n(.*?)^```", section.group(1), re.DOTALL | re.MULTILINE)
    assert block, "the Python API section has no python code block"
    return block.group(1)


def test_python_api_example_runs_without_torch(tmp_path):
    """The example runs as written in a fresh interpreter, prints the estimate and the plan it computed, and leaves
    torch and transformers unimported (the planner's promise)."""
    code = python_api_example(README.read_text(encoding="utf-8"))
    check = "\nimport sys\nprint('imported:', sorted({'torch', 'transformers'} & set(sys.modules)))\n"
    done = subprocess.run([sys.executable, "-c", code + check], cwd=tmp_path, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"peak \d+\.\d\d GiB per GPU \((forward|loss|backward|optimizer)\), fits: True", lines[0])
    assert re.fullmatch(r"micro-batch \d+ x accumulation \d+ x 4 GPUs, ZeRO [0-3], \d+\.\d\d s per step", lines[-2])
    assert lines[-1] == "imported: []"


def file_tree_paths(text: str) -> list[str]:
    """The paths the README's "## Files" tree names: the first column of each line (names separated by ", "),
    nested by indentation under the folder lines (names ending in /)."""
    section = re.search(r"^## Files\n(.*?)(?=^## |\Z)", text, re.DOTALL | re.MULTILINE)
    assert section, "README.md has no '## Files' section"
    block = re.search(r"^```\n(.*?)^```", section.group(1), re.DOTALL | re.MULTILINE)
    folders: list[tuple[int, str]] = []  # (indent, path) of the enclosing folders
    paths = []
    for line in block.group(1).splitlines():
        indent = len(line) - len(line.lstrip(" "))
        column = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        if not column or indent >= 20:  # a continuation of the description column
            continue
        folders = [(i, p) for i, p in folders if i < indent]
        parent = folders[-1][1] if folders else ""
        for name in column.split(", "):
            if name.endswith("...") or not re.fullmatch(r"[\w.\-/]+", name):
                continue
            paths.append(parent + name)
            if name.endswith("/"):
                folders.append((indent, parent + name))
    return paths


def test_the_file_tree_names_files_that_exist():
    paths = file_tree_paths(README.read_text(encoding="utf-8"))
    assert "vlplan/__init__.py" in paths and "planner/memory/estimate.py" in paths
    missing = [path for path in paths if not (REPO / path).exists()]
    assert not missing, missing
