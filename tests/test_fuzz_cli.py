"""Fuzz the CLI: valid, boundary and absurd flag values must never crash it.

Hypothesis draws command lines for the torch-free commands (estimate, tokens, plan, scan, tables) and tiny-model's
refusals, from values that are valid, at a boundary or absurd (nan, inf, negative, huge integers, empty strings,
wrong types, folders where files go, files where folders go, read-only folders). Each command line runs in a fresh
folder, in a subprocess capped at `MEMORY_CAP_BYTES` of address space and `TIME_CAP_S` seconds. A run fails the test
on a Python traceback, an exit code other than 0/1/2, an exit 2 whose stderr is not exactly one `error: ` line, or
a failed command that leaves a file behind. `derandomize=True` draws the same examples on every run.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

MEMORY_CAP_BYTES = 2 * 2**30  # address space: torch-free commands need ~0.3 GiB; a runaway list needs far more
TIME_CAP_S = 30  # every command here answers in about a second; a hang is a failure
# drawn per command (plus the explicit examples): about 1 s each on 2 cores, ~50 s for the file;
# VLPLAN_FUZZ_EXAMPLES=200 hunts further
EXAMPLES = int(os.environ.get("VLPLAN_FUZZ_EXAMPLES", "6"))

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

INTS = ["0", "1", "-1", "2", "3", "8", "16", "2048", "100000", "1000000000", "9223372036854775808",
        "-9223372036854775809", "1e308", "1.5", "nan", "", "abc"]
FLOATS = ["0", "0.05", "0.4", "1", "2", "-1", "40", "nan", "inf", "-inf", "1e308", "-0", "", "x"]
SIZES = ["448x448", "1920x1080", "1x10000", "10000x1", "0x100", "2097152x2097152", "448", "x", "", "-4x4",
         "9223372036854775808x1"]
PATHS = ["files", "afile", "afile/sub", "readonly/out", "missing/deeper/x", "onlytype", "data.json", "obj.json",
         "bad.json", "train.yaml", "ds.json", "", "/sys/vlplan-fuzz"]
MODELS = ["qwen2-vl-2b", "qwen2.5-vl-7b", "llava-1.5-7b", "gemma-3-4b", "llama-3.2-11b-vision", "phi-3.5-vision",
          "minicpm-v-2.6", "nope", "", "onlytype", "afile", "files"]


def _choice(*values):
    return st.sampled_from(list(values))


SETUP_FLAGS = {
    "--method": _choice("full", "freeze", "lora", "qlora", "", "LORA", "sgd"),
    "--lora-rank": st.sampled_from(INTS),
    "--lora-alpha": st.sampled_from(INTS),
    "--lora-target": _choice("all", "q_proj,v_proj", "nope", "", ",", "k_proj"),
    "--lora-dropout": st.sampled_from(FLOATS),
    "--dora": None,
    "--train-vision": None,
    "--freeze-vision": None,
    "--train-projector": None,
    "--freeze-llm": None,
    "--freeze-trainable-layers": st.sampled_from(INTS),
    "--precision": _choice("bf16", "fp16", "fp32", "pure-bf16", "fp8", ""),
    "--quant-bits": st.sampled_from(INTS),
    "--optimizer": _choice("adamw", "sgd", "adafactor", "adamw-8bit", "lion", ""),
    "--seq-len": st.sampled_from(INTS),
    "--batch-size": st.sampled_from(INTS),
    "--gradient-accumulation-steps": st.sampled_from(INTS),
    "--images": st.sampled_from(INTS),
    "--image-size": st.sampled_from(SIZES),
    "--image-max-pixels": st.sampled_from(INTS),
    "--image-min-pixels": st.sampled_from(INTS),
    "--attn": _choice("sdpa", "fa2", "eager", "flash", ""),
    "--no-gradient-checkpointing": None,
    "--gpu": _choice("h100", "a100-40g", "v100", "t4", "nope", ""),
    "--gpu-memory-gib": st.sampled_from(FLOATS),
    "--num-gpus": st.sampled_from(INTS),
    "--num-nodes": st.sampled_from(INTS),
    "--zero": st.sampled_from(INTS),
    "--offload": _choice("none", "optimizer", "all", "disk", ""),
    "--from-llamafactory": st.sampled_from(PATHS),
    "--deepspeed": st.sampled_from(PATHS),
    "--dataset": st.sampled_from(PATHS),
}
PLAN_FLAGS = {
    **{k: v for k, v in SETUP_FLAGS.items() if k not in ("--batch-size", "--gradient-accumulation-steps")},
    "--margin": st.sampled_from(FLOATS),
    "--num-samples": st.sampled_from(INTS),
    "--epochs": st.sampled_from(FLOATS),
    "--mfu": st.sampled_from(FLOATS),
    "--host-ram-gib": st.sampled_from(FLOATS),
    "--export-llamafactory": st.sampled_from(PATHS),
    "--export-deepspeed": st.sampled_from(PATHS),
    "--export-hf-args": st.sampled_from(PATHS),
    "--maximize": _choice("image-max-pixels", "cutoff-len", "micro-batch", "video-frames", "nope", ""),
}
TOKENS_FLAGS = {"--image-max-pixels": st.sampled_from(INTS), "--image-min-pixels": st.sampled_from(INTS),
                "--image": st.sampled_from(SIZES)}
SCAN_FLAGS = {k: SETUP_FLAGS[k] for k in ("--image-max-pixels", "--image-min-pixels", "--seq-len", "--method",
                                          "--from-llamafactory")}
TABLES_FLAGS = {
    "--methods": _choice("lora", "full,freeze", "all", "nope", ""),
    "--gpus": _choice("h100", "h100,v100", "nope", ""),
    "--seq-lens": _choice("1024", "2048,8192", "0", "-1", "1e308", "nan", "", "9223372036854775808"),
    "--image-sizes": _choice("448x448", "none", "1x10000", "0x0", ""),
    "--images": st.sampled_from(INTS),
    "--image-max-pixels": st.sampled_from(INTS),
    "--margin": st.sampled_from(FLOATS),
    "--attn": _choice("sdpa", "fa2", "nope"),
    "--lora-rank": st.sampled_from(INTS),
    "--quant-bits": st.sampled_from(INTS),
    "--format": _choice("md", "csv", "json", "md,csv", "pdf", ""),
    "--out": st.sampled_from(PATHS),
    "--workers": _choice("1", "0", "-1", "1000000", "nan"),
}
TINY_FLAGS = {"--text-layers": _choice("0", "-1", "100000", "1.5", "nan", ""),
              "--vision-layers": _choice("0", "-1", "100000", "x"),
              "--family": _choice("llava", "nope", "")}


def _draw_flags(draw, table: dict, max_size: int = 4) -> list[str]:
    """Up to `max_size` distinct flags of `table` with drawn values (boolean flags stand alone)."""
    args = []
    for name in draw(st.lists(st.sampled_from(sorted(table)), unique=True, max_size=max_size)):
        args.append(name)
        if table[name] is not None:
            args.append(draw(table[name]))
    return args


@st.composite
def estimate_argv(draw):
    return ["estimate", "--model", draw(st.sampled_from(MODELS)), *_draw_flags(draw, SETUP_FLAGS)]


@st.composite
def tokens_argv(draw):
    return ["tokens", "--model", draw(st.sampled_from(MODELS)), "--image", draw(st.sampled_from(SIZES)),
            *_draw_flags(draw, TOKENS_FLAGS, max_size=3)]


@st.composite
def plan_argv(draw):
    batch = draw(st.sampled_from(["8", "1", "0", "-4", "1000000000", "9223372036854775808", "nan", ""]))
    return ["plan", "--model", draw(st.sampled_from(MODELS)), "-g", batch, *_draw_flags(draw, PLAN_FLAGS, 3)]


@st.composite
def scan_argv(draw):
    return ["scan", draw(st.sampled_from(PATHS)), "--model", draw(st.sampled_from(MODELS)),
            *_draw_flags(draw, SCAN_FLAGS, max_size=2)]


@st.composite
def tables_argv(draw):
    models = draw(st.sampled_from(["qwen2-vl-2b", "llava-1.5-7b,qwen2-vl-2b", "nope", ""]))
    return ["tables", "--models", models, *_draw_flags(draw, TABLES_FLAGS, max_size=3)]


@st.composite
def tiny_model_refusal_argv(draw):
    """Only draws that are refused (a bad layer count, family or output path): a tiny model written by a valid
    draw would import torch and take seconds (tests/test_tiny_model.py covers the valid ones)."""
    out = draw(st.sampled_from(["afile", "afile/sub", "/sys/vlplan-fuzz", "files/m"]))
    flags = _draw_flags(draw, TINY_FLAGS, max_size=3)
    if "--family" not in flags:
        flags += ["--family", "nope"]
    if out == "files/m" and "nope" not in flags and "" not in flags:
        flags[flags.index("--family") + 1] = "nope"
    return ["tiny-model", out, *flags]


def _sandbox(root: Path) -> None:
    """The paths that PATHS and MODELS name, relative to the command's working folder."""
    (root / "files").mkdir()
    (root / "afile").write_text("a file where a folder is expected\n")
    (root / "readonly").mkdir()
    (root / "onlytype").mkdir()
    (root / "onlytype" / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    (root / "data.json").write_text(json.dumps([{"messages": [{"role": "user", "content": "hi " * 50},
                                                              {"role": "assistant", "content": "hello"}]}]))
    (root / "obj.json").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    (root / "bad.json").write_text("{not json")
    (root / "train.yaml").write_text("model_name_or_path: qwen2-vl-2b\nfinetuning_type: lora\ncutoff_len: 1024\n")
    (root / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    (root / "readonly").chmod(0o555)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _limit_resources() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP_BYTES, MEMORY_CAP_BYTES))


def check_command(argv: list[str]) -> None:
    """Run `vlplan argv` in a fresh sandbox folder under the caps and check the contract (module docstring)."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        _sandbox(root)
        before = _files(root)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "100",
               "PYTHONWARNINGS": "ignore"}
        try:
            proc = subprocess.run([sys.executable, "-c", "from vlplan.cli.main import app; app(prog_name='vlplan')",
                                   *argv], cwd=root, capture_output=True, text=True, timeout=TIME_CAP_S,
                                  preexec_fn=_limit_resources, env=env, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pytest.fail(f"vlplan {' '.join(argv)}: no answer in {TIME_CAP_S} s")
        finally:
            (root / "readonly").chmod(0o755)  # let the folder be cleaned up
        where = f"vlplan {' '.join(map(repr, argv))}"
        assert "Traceback" not in proc.stderr, f"{where}:\n{proc.stderr[-3000:]}"
        assert proc.returncode in (0, 1, 2), f"{where}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        if proc.returncode == 2:
            errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1, f"{where}: stderr is not one error line:\n{proc.stderr[-3000:]}"
        if proc.returncode != 0:
            left = _files(root) - before
            assert not left, f"{where} failed (exit {proc.returncode}) and left {sorted(left)}"


# Each test runs the reported crashes first (explicit examples), then the drawn command lines
@FUZZ
@given(estimate_argv())
@example(["estimate", "--model", "qwen2.5-vl-7b", "--gpu-memory-gib", "nan"])
@example(["estimate", "--model", "qwen2.5-vl-7b", "--images", "1000000000"])
@example(["estimate", "--model", "qwen2.5-vl-7b", "--batch-size", "1000000"])
@example(["estimate", "--model", "onlytype", "--seq-len", "1.5"])
def test_estimate_never_crashes(argv):
    check_command(argv)


@FUZZ
@given(tokens_argv())
@example(["tokens", "--model", "qwen2.5-vl-7b", "--image", "1x10000", "--image-max-pixels", "100",
          "--image-min-pixels", "50"])
@example(["tokens", "--model", "qwen2.5-vl-7b", "--image", "448x448", "--image-max-pixels", "-1"])
def test_tokens_never_crashes(argv):
    check_command(argv)


@FUZZ
@given(plan_argv())
@example(["plan", "--model", "qwen2-vl-2b", "-g", "1000000000"])
@example(["plan", "--model", "qwen2-vl-2b", "-g", "8", "--export-llamafactory", "files"])
@example(["plan", "--model", "qwen2-vl-2b", "-g", "8", "--mfu", "nan", "--epochs", "-1"])
@example(["plan", "--model", "qwen2-vl-2b", "-g", "1000000000", "--maximize", "cutoff-len"])
@example(["plan", "--model", "qwen2-vl-2b", "-g", "8", "--maximize", "image-max-pixels", "--images", "0"])
def test_plan_never_crashes(argv):
    check_command(argv)


@FUZZ
@given(scan_argv())
@example(["scan", "obj.json", "--model", "qwen2-vl-2b"])
def test_scan_never_crashes(argv):
    check_command(argv)


@FUZZ
@given(tables_argv())
@example(["tables", "--models", "qwen2-vl-2b", "--out", "afile/sub"])
@example(["tables", "--models", "qwen2-vl-2b", "--workers", "1000000"])
def test_tables_never_crashes(argv):
    check_command(argv)


@FUZZ
@given(tiny_model_refusal_argv())
@example(["tiny-model", "files/m", "--family", "llava", "--text-layers", "100000"])
@example(["tiny-model", "/sys/vlplan-fuzz", "--family", "llava"])
def test_tiny_model_refusals_never_crash(argv):
    check_command(argv)
