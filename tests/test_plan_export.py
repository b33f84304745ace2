"""`vlplan plan --export-*`: the plan as LLaMA-Factory YAML, DeepSpeed JSON and TrainingArguments, checked by the
consumers' own parsers, and an import of the export plans the same."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from vlplan.cli.main import app

runner = CliRunner()
PLAN = ["plan", "--model", "qwen2.5-vl-7b", "--method", "full", "--gpu", "a100-40g", "--num-gpus", "8",
        "--global-batch-size", "64"]


def plan_json(*args):
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def chosen(data):
    keys = ("micro_batch_size", "gradient_accumulation_steps", "num_gpus", "num_nodes", "global_batch_size",
            "zero_stage", "offload", "gradient_checkpointing", "attn")
    return {key: data[key] for key in keys}


def test_exports_round_trip_to_the_same_plan(tmp_path):
    out = tmp_path / "train.yaml"
    first = plan_json(*PLAN, "--export-llamafactory", str(out), "--export-hf-args", str(tmp_path / "args.json"))
    assert first["zero_stage"] > 0  # a 7B full fine-tune needs ZeRO on 40 GB cards
    ds_name = f"ds_z{first['zero_stage']}{'_offload' if first['offload'] != 'none' else ''}_config.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["train.yaml", "args.json", ds_name])
    assert set(first["exported"]) == {str(out), str(tmp_path / "args.json"), str(tmp_path / ds_name)}
    config = yaml.safe_load(out.read_text())
    assert config["per_device_train_batch_size"] == first["micro_batch_size"]
    assert config["gradient_accumulation_steps"] == first["gradient_accumulation_steps"]
    assert config["deepspeed"] == str(tmp_path / ds_name)
    again = plan_json("plan", "--from-llamafactory", str(out), "--gpu", "a100-40g", "--num-gpus", "8",
                      "--global-batch-size", "64")
    assert chosen(again) == chosen(first)
    assert again["estimate"]["peak_bytes"] == first["estimate"]["peak_bytes"]


def test_exported_configs_parse_with_transformers_and_deepspeed(tmp_path):
    pytest.importorskip("deepspeed")
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    data = plan_json(*PLAN, "--export-deepspeed", str(tmp_path / "ds.json"),
                     "--export-hf-args", str(tmp_path / "args.json"))
    args = json.loads((tmp_path / "args.json").read_text())
    assert args["deepspeed"] == str(tmp_path / "ds.json")
    assert args["per_device_train_batch_size"] == data["micro_batch_size"]
    hf_ds = HfTrainerDeepSpeedConfig(json.loads((tmp_path / "ds.json").read_text()))
    assert hf_ds.config["zero_optimization"]["stage"] == data["zero_stage"]
    args.pop("deepspeed")  # TrainingArguments would initialize DeepSpeed's distributed backend
    TrainingArguments(**args, use_cpu=True)


def test_exports_never_overwrite_without_asking(tmp_path):
    out = tmp_path / "train.yaml"
    out.write_text("my own config\n")
    result = runner.invoke(app, [*PLAN, "--export-llamafactory", str(out)])
    assert result.exit_code == 2
    assert "already exist" in result.output and "--overwrite" in result.output
    assert out.read_text() == "my own config\n"
    assert list(tmp_path.iterdir()) == [out]  # nothing else written either
    result = runner.invoke(app, [*PLAN, "--export-llamafactory", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "per_device_train_batch_size" in out.read_text()


def test_export_errors_are_one_line(tmp_path):
    result = runner.invoke(app, [*PLAN, "--export-llamafactory", str(tmp_path / "missing" / "train.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output
    assert "Traceback" not in result.output
    lora = ["plan", "--model", "qwen2-vl-2b", "--method", "lora", "--gpu", "h100-80g", "--global-batch-size", "4"]
    result = runner.invoke(app, [*lora, "--export-deepspeed", str(tmp_path / "ds.json")])
    assert result.exit_code == 2 and "drop --export-deepspeed" in result.output
    assert not (tmp_path / "ds.json").exists()


FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "llamafactory" / "examples"


def test_the_exported_yaml_is_a_complete_training_file(tmp_path):
    out = tmp_path / "train.yaml"
    result = runner.invoke(app, [*PLAN, "--epochs", "2", "--export-llamafactory", str(out)])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load(out.read_text())
    for key in ("dataset", "dataset_dir", "template", "output_dir", "learning_rate", "num_train_epochs",
                "lr_scheduler_type", "warmup_steps", "logging_steps", "save_steps", "report_to", "deepspeed"):
        assert key in config, key
    assert config["template"] == "qwen2_vl" and config["num_train_epochs"] == 2.0
    assert "# FILL IN" in out.read_text()
    assert f"warning: {out}: dataset is a placeholder" in result.stderr


def test_an_input_yaml_keeps_its_keys_and_epochs(tmp_path):
    source = tmp_path / "mine.yaml"
    base = yaml.safe_load((FIXTURES / "train_lora" / "qwen2_5vl_lora_sft.yaml").read_text())
    base.update(num_train_epochs=3.0, fsdp="shard_grad_op")
    source.write_text(yaml.safe_dump(base))
    out = tmp_path / "train.yaml"
    args = ["plan", "--from-llamafactory", str(source), "--num-gpus", "2", "-g", "8", "--num-samples", "800"]
    data = plan_json(*args, "--export-llamafactory", str(out))
    config = yaml.safe_load(out.read_text())
    for key, value in base.items():
        if key not in ("per_device_train_batch_size", "gradient_accumulation_steps", "fsdp", "deepspeed",
                       "warmup_ratio"):
            assert config[key] == value, key
    assert "fsdp" not in config and config["warmup_steps"] == base["warmup_ratio"]
    assert config["per_device_train_batch_size"] == data["micro_batch_size"]
    assert "FILL IN" not in out.read_text()
    # the file's epochs are the plan's epochs (GPU-hours), unless --epochs says otherwise
    assert data["epochs"] == 3.0 and data["gpu_hours"] == pytest.approx(3 * data["epoch_time_s"] * 2 / 3600)
    result = runner.invoke(app, [*args, "--epochs", "1.5", "--export-llamafactory", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(out.read_text())["num_train_epochs"] == 1.5
    assert "removed fsdp from the input YAML" in result.stderr


def _leftovers(folder):
    return sorted(p.name for p in folder.rglob("*"))


def test_an_export_path_that_is_a_folder_is_one_line_and_writes_nothing(tmp_path):
    for flag in ("--export-llamafactory", "--export-deepspeed", "--export-hf-args"):
        result = runner.invoke(app, [*PLAN, flag, str(tmp_path)])
        assert result.exit_code == 2, result.output
        errors = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
        assert len(errors) == 1 and errors[0].startswith("error: ") and "is a folder" in errors[0]
        assert "Traceback" not in result.output
        assert _leftovers(tmp_path) == []
    out = tmp_path / "same.json"
    result = runner.invoke(app, [*PLAN, "--export-deepspeed", str(out), "--export-hf-args", str(out)])
    assert result.exit_code == 2 and "two exports" in result.stderr and _leftovers(tmp_path) == []


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    """A write that fails after the checks passed (simulated: the tests may run as root, who writes anywhere): one
    line naming the file, exit 2, and the files already staged for the other exports are removed too."""
    import os
    import tempfile

    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkstemp, real_fdopen = tempfile.mkstemp, os.fdopen
    folder_of = {}

    def mkstemp(*args, dir=None, **kwargs):
        fd, name = real_mkstemp(*args, dir=dir, **kwargs)
        folder_of[fd] = Path(name).parent
        return fd, name

    def fdopen(fd, *args, **kwargs):
        if folder_of.get(fd) == locked:
            os.close(fd)
            raise PermissionError(13, "Permission denied")
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "fdopen", fdopen)
    result = runner.invoke(app, [*PLAN, "--export-deepspeed", str(tmp_path / "ds.json"),
                                 "--export-hf-args", str(tmp_path / "args.json"),
                                 "--export-llamafactory", str(locked / "train.yaml")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
    assert errors == [f"error: cannot write {locked / 'train.yaml'}: Permission denied"]
    assert _leftovers(tmp_path) == ["locked"]


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root writes into chmod 555 folders; the test above "
                                                          "covers the same path with a failing write")
def test_a_read_only_folder_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = runner.invoke(app, [*PLAN, "--export-llamafactory", str(locked / "train.yaml")])
    finally:
        locked.chmod(0o755)
    assert result.exit_code == 2 and "Permission denied" in result.stderr
    assert _leftovers(locked) == []


def test_a_plan_exported_for_llamafactory_is_planned_for_its_stack(tmp_path):
    """LLaMA-Factory trains the exported YAML with its own model preparation, so the plan is made for that stack
    unless --stack is typed."""
    import json

    from typer.testing import CliRunner

    from vlplan.cli.main import app

    out = tmp_path / "train.yaml"
    args = ["plan", "--model", "qwen2-vl-2b", "-g", "8", "--export-llamafactory", str(out), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["stack"] == "llamafactory" and "LLaMA-Factory's stack" in result.stderr
    result = CliRunner().invoke(app, [*args, "--stack", "vlplan", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["stack"] == "vlplan"
