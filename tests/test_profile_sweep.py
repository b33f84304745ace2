"""`vlplan profile --sweep` for real: configurations in their own processes (an OOM, a crash and a hang end only
their own; SIGTERM takes the running worker down too), results files that never lose records, sweep-file errors,
and the ready GPU accuracy sweep."""

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from tiny import tiny_spec  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from vlplan.cli.main import app  # noqa: E402
from vlplan.planner.errors import VlplanError  # noqa: E402
from vlplan.planner.hf_config import spec_to_hf_config  # noqa: E402
from vlplan.profiler.sweep import append_records, load_sweep, read_records, run_sweep  # noqa: E402

runner = CliRunner()
READY = Path(__file__).resolve().parents[1] / "benchmarks" / "sweeps" / "gpu_accuracy.yaml"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2-vl")
    (path / "config.json").write_text(json.dumps(spec_to_hf_config(tiny_spec("qwen2-vl-2b"))))
    return path


def write_sweep(path: Path, tiny_dir: Path, configs: list[str]) -> Path:
    path.write_text(f"defaults: {{model: {tiny_dir}, seq_len: 256, image_size: 224x224, steps: 1}}\n"
                    "configs:\n" + "".join(f"  - {c}\n" for c in configs))
    return path


@pytest.mark.slow
def test_sweep_survives_oom_crash_and_hang_and_keeps_earlier_records(tiny_dir, tmp_path):
    broken = tmp_path / "no-weights"  # a config.json and no weights: from_pretrained raises in the worker
    broken.mkdir()
    (broken / "config.json").write_text((tiny_dir / "config.json").read_text())
    sweep = write_sweep(tmp_path / "sweep.yaml", tiny_dir, [
        "{method: lora, memory_limit_gib: 0.005}",
        f"{{method: lora, weights: {broken}}}",
        "{method: full, timeout_s: 0.5}",
    ])
    results = tmp_path / "results.json"
    earlier = [{"config": {"model": "an earlier run"}, "oom": False, "error": None}]
    results.write_text(json.dumps(earlier))
    result = run("profile", "--sweep", sweep, "--backend", "cpu", "--output", results)
    assert result.exit_code == 1, result.output  # two configurations failed; the sweep went on
    assert "3 run, 0 skipped, 1 out of memory, 2 failed" in result.stdout
    records = read_records(results)
    assert len(records) == 4 and records[0] == earlier[0]
    oom, crash, hang = records[1:]
    assert oom["oom"] is True and oom["error"] is None and oom["returncode"] == 3
    assert oom["oom_report"]["phase"] in ("forward", "loss", "backward") and oom["measured_allocated_peak_bytes"] > 0
    assert oom["device"] == "cpu" and oom["sweep_config"]["memory_limit_gib"] == 0.005
    assert crash["oom"] is False and crash["returncode"] == 1 and "without a record" in crash["error"]
    assert "no file named" in crash["error"] and crash["estimate_peak_bytes"] > 0
    assert hang["error"].startswith("timed out after 0.5 s") and hang["returncode"] == -9
    for record in records[1:]:
        assert record["config"]["seq_len"] == 256 and record["torch"] and record["transformers"]
    assert "#3" in result.stderr or "3/3" in result.stderr  # the progress bar

    # measured configurations are skipped on the next run; failed ones would run again
    configs = load_sweep(sweep, backend="cpu")
    summary = run_sweep(configs[:1], backend="cpu", output=results)
    assert (summary.ran, summary.skipped) == (0, 1) and len(read_records(results)) == 4


def test_results_file_is_never_overwritten_when_corrupt(tiny_dir, tmp_path):
    results = tmp_path / "results.json"
    for content in ('[{"config": 1}', '{"not": "a list"}'):
        results.write_text(content)
        with pytest.raises(VlplanError, match="left as it is"):
            append_records(results, [{"config": {}}])
        assert results.read_text() == content
        sweep = write_sweep(tmp_path / "sweep.yaml", tiny_dir, ["{method: lora}"])
        result = run("profile", "--sweep", sweep, "--backend", "cpu", "--output", results)
        assert result.exit_code == 2 and "left as it is" in result.stderr and "Traceback" not in result.output
        assert results.read_text() == content


def test_append_keeps_every_record_and_leaves_no_temporary_file(tmp_path):
    results = tmp_path / "deep" / "results.json"
    assert append_records(results, [{"n": 1}]) == 1
    assert append_records(results, [{"n": 2}, {"n": 3}]) == 3
    assert [r["n"] for r in read_records(results)] == [1, 2, 3]
    assert sorted(p.name for p in results.parent.iterdir()) == ["results.json"]


@pytest.mark.parametrize("content,message", [
    ("configs:\n  - {model: qwen2-vl-2b, sequence_len: 4096}\n", "unknown key 'sequence_len'; did you mean seq_len"),
    ("configs:\n  - {model: qwen2-vl-2b}\n  - {model: qwen2-vl-2b, method: sgd}\n",
     r"configuration #2 \(.*method=sgd\): --method 'sgd' is not one of"),
    ("configs:\n  - {model: qwen2-vl-2b, seq_len: 512, image_size: 2000x2000}\n", "raise --seq-len"),
    ("configs:\n  - {model: qwen2-vl-2b, zero: 2, num_gpus: 2}\n", "one training process"),
    ("configs:\n  - {model: qwen2-vl-2b, timeout_s: 0}\n", "timeout_s must be positive"),
    ("configs: [\n", "not valid YAML"),
    ("- {model: qwen2-vl-2b}\n", "expected a mapping"),
    ("configs: []\n", "holds no configuration"),
    ("configs:\n  - {model: qwen2-vl-2b}\nsetting: 1\n", "unknown top-level key"),
])
def test_sweep_file_errors_name_the_configuration(tmp_path, content, message):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(content)
    result = run("profile", "--sweep", sweep, "--backend", "cpu", "--output", tmp_path / "r.json")
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "r.json").exists()
    assert "no such file" in run("profile", "--sweep", tmp_path / "missing.yaml").stderr


def test_matrix_expands_to_every_combination(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("defaults: {seq_len: 1024, image_size: 448x448}\n"
                     "matrix:\n  - {model: qwen2-vl-2b, method: [lora, full], batch_size: [1, 2, 4]}\n"
                     "configs:\n  - {model: llava-1.5-7b}\n")
    configs = load_sweep(sweep, backend="cpu")
    assert len(configs) == 7 and configs[0].setup.model.name == "llava-1.5-7b"
    assert {(c.setup.method, c.setup.batch_size) for c in configs[1:]} == {
        (m, b) for m in ("lora", "full") for b in (1, 2, 4)}
    assert all(c.setup.seq_len == 1024 for c in configs)


def test_the_ready_gpu_accuracy_sweep_covers_the_issue():
    configs = load_sweep(READY, backend="cuda")  # every configuration resolves and is one a profile can run
    setups = [c.setup for c in configs]
    assert len(setups) >= 30
    assert {"qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2-vl-2b", "llava-1.5-7b"} <= {s.model.name for s in setups}
    assert {"full", "lora", "qlora"} <= {s.method for s in setups}
    assert any(s.method == "lora" and s.vision.value == "lora" for s in setups)  # vision-encoder LoRA
    assert {True, False} == {s.gradient_checkpointing for s in setups}
    assert min(s.seq_len for s in setups) <= 1024 and max(s.seq_len for s in setups) >= 8192
    assert {0, 1, 2, 3, 4} <= {len(s.images) for s in setups}
    sides = {w for s in setups for w, _ in s.images}
    assert min(sides) == 448 and max(sides) == 1344
    assert {1, 2, 4, 8} <= {s.batch_size for s in setups}
    # a 1344x1344 image keeps its size: (1344 / 28)^2 = 2304 tokens for Qwen
    big = next(s for s in setups if s.model.name == "qwen2.5-vl-7b" and s.images == ((1344, 1344),))
    assert big.vision_tokens_per_sample == 2304


@pytest.mark.slow
def test_sigterm_ends_the_sweep_and_its_running_worker(tiny_dir, tmp_path):
    """A sweep stopped by SIGTERM (e.g. `timeout`) kills the worker it started in its own session: nothing keeps
    running on the device after the sweep."""
    import os
    import signal
    import subprocess
    import sys
    import time

    sweep = write_sweep(tmp_path / "sweep.yaml", tiny_dir, ["{method: lora, steps: 100}"])
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the worker's job files, and so its command line, under tmp_path
    process = subprocess.Popen([sys.executable, "-m", "vlplan.cli.main", "profile", "--sweep", str(sweep),
                                "--backend", "cpu", "--output", str(tmp_path / "r.json")], env=env,
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)

    def workers():
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = open(f"/proc/{pid}/cmdline").read()
            except OSError:
                continue
            if "vlplan.profiler.sweep" in cmdline and str(tmp_path) in cmdline:
                found.append(int(pid))
        return found

    deadline = time.time() + 60
    while not workers() and time.time() < deadline:
        time.sleep(0.2)
    assert workers(), "the worker did not start"
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    time.sleep(0.5)
    assert workers() == []
    assert not (tmp_path / "r.json").exists()  # no record for the interrupted configuration
