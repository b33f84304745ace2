"""`vlplan run --from-llamafactory train.yaml` trains what the YAML says (model, dataset in its dataset_dir, output
directory, learning rate, steps, schedule, save and logging keys), flags typed on the command line win, and every
training key it does not apply is named in a warning; `vlplan scan --from-llamafactory` finds the YAML's dataset."""

import json
import math

import pytest

from vlplan.planner.errors import VlplanError
from vlplan.planner.io.llamafactory_run import llamafactory_run_options

YAML_KEYS = """\
model_name_or_path: {model}
stage: sft
do_train: true
finetuning_type: lora
dataset: shapes
dataset_dir: {data_dir}
cutoff_len: 256
output_dir: {out}
learning_rate: 5e-3
max_steps: 3
num_train_epochs: 3.0
lr_scheduler_type: constant
logging_steps: 1
save_steps: 2
save_total_limit: 1
per_device_train_batch_size: 1
report_to: none
"""


# The YAML reader (pure Python) -------------------------------------------------------------------------------------
def test_run_keys_become_run_options(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text("{}")
    config = {"model_name_or_path": "m", "dataset": "shapes", "dataset_dir": str(tmp_path / "data"),
              "output_dir": "saves/x", "learning_rate": "5e-3", "max_steps": 3, "num_train_epochs": 2.0,
              "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "save_steps": 50, "save_strategy": "steps",
              "save_total_limit": 2, "logging_steps": 10, "seed": 7, "max_samples": 100}
    options, warnings = llamafactory_run_options(config)
    assert options == {"model": "m", "dataset": "shapes", "dataset_dir": str(tmp_path / "data"),
                       "dataset_info": str(tmp_path / "data" / "dataset_info.json"), "output_dir": "saves/x",
                       "learning_rate": 5e-3, "max_steps": 3, "epochs": 2.0, "lr_scheduler_type": "cosine",
                       "warmup_ratio": 0.1, "save_steps": 50, "save_strategy": "steps", "save_total_limit": 2,
                       "logging_steps": 10, "seed": 7, "max_samples": 100}
    assert warnings == []
    # HF's "not set" max_steps, and transformers 5's ratio-valued warmup_steps
    options, _ = llamafactory_run_options({"max_steps": -1, "warmup_steps": 0.05})
    assert "max_steps" not in options and options["warmup_ratio"] == 0.05


def test_every_training_key_is_applied_or_named():
    config = {"template": "qwen2_vl", "weight_decay": 0.1, "adam_beta2": 0.95, "overwrite_output_dir": True,
              "use_galore": True, "val_size": 0.1, "eval_steps": 100,
              # at their defaults, without effect on what is trained, or the TrainSetup's: silent here
              "adam_beta1": 0.9, "plot_loss": True, "preprocessing_num_workers": 16, "trust_remote_code": True,
              "bf16": True, "lora_rank": 8}
    _, warnings = llamafactory_run_options(config)
    assert [w.split(":")[1].split()[0] for w in warnings] == ["template", "weight_decay", "adam_beta2",
                                                              "overwrite_output_dir", "use_galore", "val_size",
                                                              "eval_steps"]
    assert all(len(w.splitlines()) == 1 and "not applied by vlplan run" in w for w in warnings)
    assert warnings[3] == ("the LLaMA-Factory config: overwrite_output_dir true is not applied by vlplan run (pass "
                           "--overwrite to replace an earlier run in output_dir, or --resume to continue it)")
    assert "does not evaluate" in warnings[-1]


@pytest.mark.parametrize("config,message", [
    ({"stage": "dpo"}, "stage dpo: vlplan run trains supervised fine-tuning (stage sft) only"),
    ({"dataset_dir": "ONLINE"}, "dataset_dir ONLINE loads datasets from a hub"),
    ({"dataset_dir": "/no/such/folder"}, "dataset_dir /no/such/folder does not exist"),
    ({"learning_rate": "fast"}, "learning_rate must be a positive number, got 'fast'"),
    ({"learning_rate": float("nan")}, "learning_rate must be a positive number"),
    ({"num_train_epochs": 0}, "num_train_epochs must be a positive number, got 0"),
    ({"save_steps": 0.25}, "save_steps 0.25 is a ratio of the total steps, which vlplan run does not take"),
    ({"logging_steps": "x"}, "logging_steps must be a whole number of at least 1, got 'x'"),
], ids=["stage", "online", "missing-dir", "lr-text", "lr-nan", "epochs-zero", "save-ratio",
        "logging-text"])
def test_bad_run_keys_are_refused(config, message):
    with pytest.raises(VlplanError, match=f"^the LLaMA-Factory config: {message}".replace("(", r"\(").replace(
            ")", r"\)")):
        llamafactory_run_options(config)


# Through the CLI ---------------------------------------------------------------------------------------------------
pytest.importorskip("torch")
pytest.importorskip("peft")

from test_runner_data import write_dataset  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from vlplan.cli.main import app  # noqa: E402
from vlplan.runner.tiny import write_tiny_model  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A LLaMA-Factory layout: data/dataset_info.json naming `shapes`, its file and images, and a tiny model."""
    root = tmp_path_factory.mktemp("lf")
    write_tiny_model("qwen2.5-vl", root / "model")
    data = root / "data"
    write_dataset(data, count=4)
    (data / "dataset_info.json").write_text(json.dumps({"shapes": {
        "file_name": "data.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    return root


def write_yaml(project, tmp_path, **changes) -> str:
    text = YAML_KEYS.format(model=project / "model", data_dir=project / "data", out=tmp_path / "out")
    for key, value in changes.items():
        text += f"{key}: {value}\n"
    path = tmp_path / "train.yaml"
    path.write_text(text)
    return str(path)


def trained(out):
    record = json.loads((out / "vlplan_run.json").read_text())
    state = json.loads((out / f"checkpoint-{record['steps']}" / "trainer_state.json").read_text())
    return record, state


@pytest.mark.slow
def test_run_trains_what_the_yaml_says(project, tmp_path):
    result = runner.invoke(app, ["run", "--from-llamafactory", write_yaml(project, tmp_path), "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    record, state = trained(out)
    assert record["status"] == "completed" and record["steps"] == 3 and state["global_step"] == 3
    assert record["dataset"] == "shapes" and record["dataset_stats"]["samples"] == 4
    assert record["model"] == str(project / "model") and record["run"]["learning_rate"] == 5e-3
    assert [e["learning_rate"] for e in record["losses"]] == [5e-3] * 3  # constant schedule, no warmup
    assert [e["learning_rate"] for e in state["log_history"] if "loss" in e] == [5e-3] * 3
    assert state["save_steps"] == 2 and state["logging_steps"] == 1
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]  # save_total_limit 1
    assert "template" not in result.stderr  # the YAML sets no key vlplan run ignores


@pytest.mark.slow
def test_flags_typed_on_the_command_line_win(project, tmp_path):
    other = tmp_path / "other"
    result = runner.invoke(app, ["run", "--from-llamafactory", write_yaml(project, tmp_path), "--precision", "fp32",
                                 "--lr", "1e-3", "--max-steps", "2", "--lr-scheduler-type", "linear",
                                 "--save-steps", "1", "--output-dir", str(other)])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out").exists()
    record, state = trained(other)
    assert record["steps"] == 2 and state["global_step"] == 2 and record["run"]["learning_rate"] == 1e-3
    # linear decay from 1e-3 to 0 over 2 steps, logged after each step's scheduler step
    assert [e["learning_rate"] for e in record["losses"]] == pytest.approx([1e-3, 5e-4])
    assert sorted(p.name for p in other.glob("checkpoint-*")) == ["checkpoint-2"]  # save_total_limit 1 (YAML)
    # --epochs replaces the YAML's max_steps (the length of the run is one choice): 4 samples = 4 steps an epoch
    result = runner.invoke(app, ["run", "--from-llamafactory", write_yaml(project, tmp_path), "--precision", "fp32",
                                 "--epochs", "1", "--output-dir", str(tmp_path / "epoch")])
    assert result.exit_code == 0, result.output
    assert trained(tmp_path / "epoch")[0]["steps"] == 4


def test_keys_it_cannot_apply_are_warned_about(project, tmp_path):
    path = write_yaml(project, tmp_path, template="qwen2_vl", weight_decay=0.1)
    result = runner.invoke(app, ["run", "--from-llamafactory", path, "--precision", "fp32", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "not applied by vlplan run" in line]
    assert warnings == [
        f"warning: {path}: template qwen2_vl is not applied by vlplan run (vlplan run renders each sample with the "
        "model directory's chat template)",
        f"warning: {path}: weight_decay 0.1 is not applied by vlplan run (vlplan run keeps the default 0.0)"]
    options = json.loads(json.loads(result.stdout)["env"]["VLPLAN_JOB"])["options"]
    assert (options["learning_rate"], options["max_steps"], options["dataset"]) == (5e-3, 3, "shapes")
    assert options["dataset_info"] == str(project / "data" / "dataset_info.json")
    assert not (tmp_path / "out").exists()


def test_a_yaml_naming_several_datasets_needs_one_chosen(project, tmp_path):
    path = write_yaml(project, tmp_path).replace("train.yaml", "two.yaml")
    (tmp_path / "two.yaml").write_text((tmp_path / "train.yaml").read_text().replace("dataset: shapes",
                                                                                      "dataset: shapes,more"))
    for args in (["run", "--from-llamafactory", path, "--dry-run"], ["scan", "--from-llamafactory", path]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        assert result.stderr.strip().splitlines() == [
            f"error: {path}: dataset names 2 datasets (shapes, more); vlplan reads one: merge them into one file, or "
            "pass the dataset (--dataset, or scan's DATA) to use"]
    result = runner.invoke(app, ["scan", "shapes", "--from-llamafactory", path, "--json"])
    assert result.exit_code == 0, result.output  # the name typed is looked up in the YAML's dataset_dir
    assert json.loads(result.stdout)["samples"] == 4


def test_missing_keys_and_flags_are_one_line(project, tmp_path):
    path = tmp_path / "bare.yaml"
    path.write_text(f"model_name_or_path: {project / 'model'}\n")
    result = runner.invoke(app, ["run", "--from-llamafactory", str(path)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --dataset is required")
    result = runner.invoke(app, ["run", "--from-llamafactory", str(path), "--dataset",
                                 str(project / "data" / "data.json")])
    assert result.stderr.strip().splitlines()[-1] == ("error: --output-dir is required (or output_dir in the "
                                                      "--from-llamafactory YAML)")


def test_scan_finds_the_yaml_dataset_in_its_dataset_dir(project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not where the data is: dataset_dir says where
    path = write_yaml(project, tmp_path)
    for args in (["scan", "--from-llamafactory", path, "--json"], ["scan", "shapes", "--from-llamafactory", path,
                                                                   "--json"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        scanned = json.loads(result.stdout)
        assert scanned["path"] == "shapes" and scanned["samples"] == 4 and scanned["images"] == 4
        assert math.isfinite(scanned["worst_case"]["estimate"]["peak_bytes"])
    # the name means nothing without the YAML's dataset_dir
    result = runner.invoke(app, ["scan", "shapes", "--model", str(project / "model")])
    assert result.exit_code == 2 and result.stderr.strip() == "error: dataset shapes does not exist"
    result = runner.invoke(app, ["scan", "--model", str(project / "model")])
    assert result.exit_code == 2 and result.stderr.strip().startswith("error: no dataset to scan")
