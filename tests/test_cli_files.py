"""The CLI with files: `estimate --from-llamafactory/--deepspeed/--dataset`, `vlplan scan`, and their errors (exit 2,
one line, no traceback)."""

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from vlplan.cli.main import app
from vlplan.planner.io.llamafactory import setup_from_llamafactory

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory" / "examples"
LORA_YAML = FIXTURES / "train_lora" / "qwen2_5vl_lora_sft.yaml"
FULL_YAML = FIXTURES / "train_full" / "qwen2_5vl_full_sft.yaml"
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def run_json(*args):
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


def test_estimate_from_llamafactory_needs_no_model():
    data, stderr = run_json("estimate", "--from-llamafactory", LORA_YAML)
    setup, _ = setup_from_llamafactory(LORA_YAML)
    assert data["settings"] == setup.describe()
    assert data["sources"] == {"llamafactory": str(LORA_YAML)} and data["warnings"] == [] and stderr == ""


def test_explicit_flags_override_the_yaml_defaults_do_not():
    data, _ = run_json("estimate", "--from-llamafactory", FULL_YAML, "--batch-size", "2", "--num-gpus", "8",
                       "--seq-len", "4096", "--gpu", "a100-80g")
    s = data["settings"]
    assert (s["batch_size"], s["num_gpus"], s["seq_len"], s["gpu"]) == (2, 8, 4096, "a100-80g")
    assert (s["method"], s["zero"], s["gradient_accumulation_steps"]) == ("full", 3, 2)  # from the YAML
    # a typed flag wins whatever its value, its default included
    data, _ = run_json("estimate", "--from-llamafactory", FULL_YAML, "--method", "lora")
    assert data["settings"]["method"] == "lora"
    data, _ = run_json("estimate", "--from-llamafactory", FULL_YAML, "--method", "freeze", "--zero", "2")
    assert (data["settings"]["method"], data["settings"]["zero"]) == ("freeze", 2)


def test_deepspeed_alone_and_over_the_yaml():
    ds = FIXTURES / "deepspeed" / "ds_z2_offload_config.json"
    data, _ = run_json("estimate", "--model", "qwen2-vl-2b", "--method", "full", "--deepspeed", ds)
    s = data["settings"]
    assert (s["zero"], s["offload"], s["ds_reduce_bucket_size"]) == (2, "optimizer", 500_000_000)
    data, _ = run_json("estimate", "--from-llamafactory", FULL_YAML, "--deepspeed", ds)
    assert (data["settings"]["zero"], data["settings"]["offload"]) == (2, "optimizer")
    assert set(data["sources"]) == {"llamafactory", "deepspeed"}
    data, _ = run_json("estimate", "--from-llamafactory", FULL_YAML, "--deepspeed", ds, "--zero", "3")
    assert data["settings"]["zero"] == 3  # the explicit flag wins over both files


def test_new_modules_import_no_torch():
    import subprocess
    import sys

    code = ("import sys, vlplan.planner.io.llamafactory, vlplan.planner.io.deepspeed, vlplan.planner.io.hf_args, "
            "vlplan.planner.dataset, vlplan.cli.scan; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_deepspeed_flag_replaces_an_unresolvable_yaml_path(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("model_name_or_path: qwen2-vl-2b\nfinetuning_type: full\nper_device_train_batch_size: 1\n"
                      "bf16: true\ndeepspeed: /cluster/configs/my_config.json\n")
    ds = FIXTURES / "deepspeed" / "ds_z3_config.json"
    data, _ = run_json("estimate", "--from-llamafactory", config, "--deepspeed", ds)
    assert data["settings"]["zero"] == 3 and data["warnings"] == []


def test_warnings_go_to_stderr_and_json(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("model_name_or_path: qwen2-vl-2b\nbf16: true\nenable_liger_kernel: true\n")
    data, stderr = run_json("estimate", "--from-llamafactory", config)
    assert data["settings"]["batch_size"] == 8 and data["settings"]["liger_kernel"] is True
    assert any("per_device_train_batch_size is missing" in w for w in data["warnings"])
    assert "warning: " in stderr and "per_device_train_batch_size" in stderr


@pytest.fixture
def dataset(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (1920, 1080)).save(tmp_path / "imgs" / "big.jpg")
    Image.new("RGB", (320, 240)).save(tmp_path / "imgs" / "small.png")
    records = [{"messages": [{"role": "user", "content": "<image>" + "word " * n},
                             {"role": "assistant", "content": "ok"}], "images": [image]}
               for n, image in ((10, "imgs/small.png"), (20, "imgs/big.jpg"), (400, "imgs/small.png"),
                                (5, "imgs/gone.png"))]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_estimate_with_dataset_plans_for_the_longest_sample(dataset):
    data, _ = run_json("estimate", "--model", "qwen2.5-vl-7b", "--dataset", dataset)
    d = data["dataset"]
    assert d["samples"] == 4 and d["planned_sample"] == d["longest"]["index"]
    assert data["settings"]["seq_len"] == d["total_tokens"]["max"]
    assert data["settings"]["images"] == d["longest"]["images"]
    assert any("missing" in w for w in data["warnings"])
    p50, _ = run_json("estimate", "--model", "qwen2.5-vl-7b", "--dataset", dataset, "--percentile", "50")
    assert p50["settings"]["seq_len"] == p50["dataset"]["total_tokens"]["p50"]
    assert any("planning for the p50 sample" in w for w in p50["warnings"])
    assert p50["peak_bytes"] <= data["peak_bytes"]


def test_scan_json_and_render(dataset):
    data, _ = run_json("scan", dataset, "--model", "qwen2.5-vl-7b", "--cutoff-len", "200")
    for key in ("samples", "vision_tokens", "total_tokens", "over_cutoff", "missing_images", "corrupt_images",
                "worst_case", "text_tokens_method"):
        assert key in data
    assert data["samples"] == 4 and data["missing_images"] == ["imgs/gone.png"] and data["cutoff_len"] == 200
    assert data["over_cutoff"] == [i for i in range(4) if i in (1, 2)]
    assert data["worst_case"]["estimate"]["settings"]["seq_len"] == data["total_tokens"]["max"]
    human = run("scan", dataset, "--model", "qwen2.5-vl-7b", "--cutoff-len", "200")
    assert human.exit_code == 0, human.output
    assert "2 samples over cutoff_len 200" in human.stdout and "1 missing image" in human.stdout
    assert "worst case" in human.stdout


def test_scan_with_llamafactory_yaml_takes_its_limits(dataset):
    data, _ = run_json("scan", dataset, "--from-llamafactory", LORA_YAML)
    assert (data["image_max_pixels"], data["cutoff_len"], data["model"]) == (262144, 2048, "qwen2.5-vl-7b")


@pytest.mark.parametrize("args, message", [
    (["estimate", "--from-llamafactory", "nope.yaml"], "does not exist"),
    (["estimate", "--model", "qwen2-vl-2b", "--deepspeed", "nope.json"], "does not exist"),
    (["estimate", "--model", "qwen2-vl-2b", "--dataset", "nope.json"], "dataset nope.json does not exist"),
    (["scan", "nope.json", "--model", "qwen2-vl-2b"], "dataset nope.json does not exist"),
    (["scan", "{data}", "--model", "qwen2-vl-2b", "--percentile", "101"], "percentile must be in"),
    (["estimate", "--from-llamafactory", "{bad_yaml}"], "not valid YAML"),
    (["estimate", "--from-llamafactory", "{bad_value}"], "lora_rank must be at least 1"),
    (["scan", "{data}"], "no model"),
])
def test_errors_are_one_line(args, message, dataset, tmp_path):
    bad_yaml, bad_value = tmp_path / "bad.yaml", tmp_path / "value.yaml"
    bad_yaml.write_text("model_name_or_path: [qwen\n")
    bad_value.write_text("model_name_or_path: qwen2-vl-2b\nlora_rank: -1\n")
    args = [a.format(data=dataset, bad_yaml=bad_yaml, bad_value=bad_value) for a in args]
    result = run(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output


# Output paths: refused before any work, one line, nothing left behind --------------------------------------------------
def _unwritable_paths(tmp_path: Path) -> list[tuple[Path, str]]:
    """(path, message) of places no command may write: under a file, a read-only folder (skipped as root, who may
    write there), and /sys (a read-only filesystem even for root)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [(afile / "sub", "is a file, not a folder")]
    import os

    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    if os.geteuid() != 0:
        cases.append((readonly / "out", "is not writable"))
    if Path("/sys").is_dir():
        cases.append((Path("/sys/vlplan-test-out"), "/sys"))
    return cases


def _files(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def _check_refused(args, message, tmp_path):
    before = _files(tmp_path)
    result = run(*args)
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert _files(tmp_path) == before


def test_tiny_model_refuses_unwritable_outputs_and_absurd_layers(tmp_path):
    for path, message in _unwritable_paths(tmp_path):
        _check_refused(["tiny-model", path, "--family", "llava"], message, tmp_path)
    _check_refused(["tiny-model", tmp_path / "afile", "--family", "llava"], "is a file, not a folder", tmp_path)
    _check_refused(["tiny-model", tmp_path / "m", "--family", "llava", "--text-layers", "100000"],
                   "--text-layers must be 1 to 128", tmp_path)
    _check_refused(["tiny-model", tmp_path / "m", "--family", "llava", "--vision-layers", "0"],
                   "--vision-layers must be 1 to 128", tmp_path)


def test_tables_refuses_unwritable_out_before_computing(tmp_path):
    for path, message in _unwritable_paths(tmp_path):
        _check_refused(["tables", "--models", "qwen2-vl-2b", "--methods", "lora", "--gpus", "h100", "--out", path],
                       message, tmp_path)
    _check_refused(["tables", "--models", "qwen2-vl-2b", "--methods", "lora", "--gpus", "h100", "--out",
                    tmp_path / "afile"], "is a file, not a folder", tmp_path)


def test_profile_refuses_unwritable_outputs_before_running(tmp_path):
    pytest.importorskip("torch")
    base = ["profile", "--model", "qwen2-vl-2b", "--backend", "cpu"]
    _check_refused([*base, "--output", tmp_path], "is a folder; give a file name", tmp_path)
    for path, message in _unwritable_paths(tmp_path):
        _check_refused([*base, "--output", path / "p.json"], message, tmp_path)
    pytest.importorskip("matplotlib")
    _check_refused([*base, "--plot", tmp_path / "afile" / "timeline.png"], "is a file, not a folder", tmp_path)
