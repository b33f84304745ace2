"""`vlplan plan --export-*`: the plan as LLaMA-Factory YAML, DeepSpeed JSON and TrainingArguments, checked by the
consumers' own parsers, and an import of the export plans the same."""

import json

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
