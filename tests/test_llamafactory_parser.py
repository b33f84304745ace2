"""The oracle for `vlplan plan --export-llamafactory`: LLaMA-Factory's own argument parser (`get_train_args`, the
function `llamafactory-cli train` calls first) accepts every exported YAML, and reads back the plan's numbers and the
input YAML's run keys.

Needs `pip install --no-deps llamafactory==0.9.5 omegaconf==2.4.0 datasets==5.2.0` (its parser imports omegaconf and
`datasets.DownloadMode`; --no-deps because its pins, transformers<=5.6 and peft<=0.18, fight ours: the parser runs
with DISABLE_VERSION_CHECK=1). Skipped without it. The parse runs in one subprocess (LLaMA-Factory configures logging
and, for DeepSpeed files, a one-process torch.distributed group), with `use_cpu: true` added on a machine without
CUDA, since transformers refuses bf16 there ("Your setup doesn't support bf16/gpu").
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

pytest.importorskip("llamafactory")
pytest.importorskip("omegaconf")

from vlplan.cli.main import app  # noqa: E402

pytestmark = pytest.mark.slow
FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory" / "examples"
runner = CliRunner()

PARSE = r"""
import json, os, sys
import yaml
from llamafactory.hparams import get_train_args

cpu = os.environ["VLPLAN_TEST_USE_CPU"] == "1"
for path in sys.argv[1:]:
    config = yaml.safe_load(open(path))
    if cpu:
        config["use_cpu"] = True
    try:
        model, data, training, finetuning, _ = get_train_args(config)
    except BaseException as err:  # ValueError, or SystemExit from a missing package
        print(json.dumps({"path": path, "error": f"{type(err).__name__}: {err}"}))
        continue
    print(json.dumps({"path": path, "model": model.model_name_or_path, "dataset": data.dataset,
                      "dataset_dir": data.dataset_dir, "template": data.template, "cutoff_len": data.cutoff_len,
                      "micro_batch": training.per_device_train_batch_size,
                      "accumulation": training.gradient_accumulation_steps, "deepspeed": training.deepspeed,
                      "output_dir": training.output_dir, "learning_rate": training.learning_rate,
                      "num_train_epochs": training.num_train_epochs, "max_steps": training.max_steps,
                      "lr_scheduler_type": str(training.lr_scheduler_type), "logging_steps": training.logging_steps,
                      "save_steps": training.save_steps, "warmup_steps": training.warmup_steps,
                      "finetuning_type": finetuning.finetuning_type, "stage": finetuning.stage,
                      "oft_rank": finetuning.oft_rank, "oft_block_size": finetuning.oft_block_size,
                      "lora_target": finetuning.lora_target,
                      "gradient_checkpointing": not model.disable_gradient_checkpointing,
                      "image_max_pixels": model.image_max_pixels, "pref_loss": finetuning.pref_loss,
                      "pref_beta": finetuning.pref_beta, "pref_ftx": finetuning.pref_ftx,
                      "kto_chosen_weight": finetuning.kto_chosen_weight,
                      "kto_rejected_weight": finetuning.kto_rejected_weight}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _templates() -> set[str]:
    """Template names LLaMA-Factory registers (`register_template(name=...)` in its data/template.py, read with ast:
    importing it needs torchaudio)."""
    spec = importlib.util.find_spec("llamafactory")
    source = Path(spec.origin).parent / "data" / "template.py"
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register_template":
            for kw in node.keywords:
                if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                    names.add(kw.value.value)
    return names


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _export(tmp: Path, name: str, args: list[str]) -> tuple[Path, dict]:
    folder = tmp / name
    folder.mkdir()
    out = folder / "train.yaml"
    result = runner.invoke(app, ["plan", *args, "--export-llamafactory", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    """Every case exported by `vlplan plan` and parsed by LLaMA-Factory in one subprocess: {name: (plan, yaml
    path, parsed fields or error)}."""
    from PIL import Image

    from vlplan.runner.tiny import write_tiny_model

    tmp = tmp_path_factory.mktemp("lf")
    # a tiny local model and a tiny sharegpt dataset with an image, for a user's own training file
    model_dir = tmp / "tiny-model"
    write_tiny_model("qwen2.5-vl", model_dir, text_layers=1, vision_layers=1)
    data_dir = tmp / "data"
    (data_dir / "images").mkdir(parents=True)
    Image.new("RGB", (64, 48), "red").save(data_dir / "images" / "red.png")
    sample = {"messages": [{"role": "user", "content": "<image>What colour?"},
                           {"role": "assistant", "content": "Red."}], "images": ["images/red.png"]}
    (data_dir / "tiny.json").write_text(json.dumps([sample]))
    (data_dir / "dataset_info.json").write_text(json.dumps({"tiny": {
        "file_name": "tiny.json", "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    own = {"model_name_or_path": str(model_dir), "trust_remote_code": True, "stage": "sft", "do_train": True,
           "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all", "dataset": "tiny",
           "dataset_dir": str(data_dir), "template": "qwen2_vl", "cutoff_len": 1024, "image_max_pixels": 65536,
           "output_dir": str(tmp / "saves" / "tiny"), "logging_steps": 1, "save_steps": 2, "plot_loss": False,
           "overwrite_output_dir": True, "report_to": "none", "per_device_train_batch_size": 1,
           "gradient_accumulation_steps": 1, "learning_rate": 5.0e-3, "max_steps": 3,
           "lr_scheduler_type": "constant", "warmup_ratio": 0.05, "bf16": True, "ddp_timeout": 180000000}
    (tmp / "own.yaml").write_text(yaml.safe_dump(own, sort_keys=False))

    # the LLaMA-Factory example files, with their deepspeed: paths where LLaMA-Factory keeps them
    examples = tmp / "examples"
    shutil.copytree(FIXTURES, examples)
    cases = {
        "lora": ["--model", "qwen2.5-vl-7b", "--method", "lora", "-g", "8"],
        "full-zero3": ["--model", "qwen2.5-vl-7b", "--method", "full", "--gpu", "a100-40g", "--num-gpus", "8",
                       "-g", "64"],
        "qlora-llava": ["--model", "llava-1.5-7b", "--method", "qlora", "--gpu", "rtx4090-24g", "-g", "4"],
        "no-template": ["--model", "phi-3.5-vision", "--method", "lora", "-g", "2"],
        "freeze-qwen3": ["--model", "qwen3-vl-8b", "--method", "freeze", "--num-gpus", "2", "-g", "8"],
        # OFT: LLaMA-Factory's finetuning_type oft with its oft_* keys, the adapted linears in lora_target
        "oft": ["--model", "qwen2.5-vl-7b", "--method", "oft", "--oft-rank", "16", "--lora-target",
                "q_proj,v_proj", "-g", "8"],
        "own": ["--from-llamafactory", str(tmp / "own.yaml"), "-g", "4"],
        # FSDP (accelerate config next to the YAML): QLoRA with 4-bit weights in the compute dtype, and a full
        # fine-tune where the plan chooses between ZeRO and FSDP
        "fsdp-qlora": ["--model", "qwen2.5-vl-7b", "--method", "qlora", "--num-gpus", "4", "-g", "16",
                       "--sharding", "fsdp"],
        "fsdp-auto-full": ["--model", "qwen2.5-vl-7b", "--method", "full", "--num-gpus", "8", "--num-nodes", "2",
                           "-g", "64", "--sharding", "auto"],
        # preference stages: a full DPO fine-tune (a frozen reference copy) under ZeRO-2, and ORPO with LoRA
        "dpo-full": ["--model", "qwen2.5-vl-3b", "--method", "full", "--stage", "dpo", "--stack", "llamafactory",
                     "--pref-beta", "0.2", "--num-gpus", "8", "--zero", "2", "-g", "32"],
        "orpo-lora": ["--model", "qwen2.5-vl-7b", "--stage", "dpo", "--pref-loss", "orpo", "--pref-ftx", "0.5",
                      "--stack", "llamafactory", "-g", "8"],
        # KTO: LoRA (the reference: adapters disabled) with its loss weights, and a full fine-tune (a frozen copy)
        "kto-lora": ["--model", "qwen2.5-vl-7b", "--stage", "kto", "--kto-chosen-weight", "1.5",
                     "--kto-rejected-weight", "0.75", "--pref-beta", "0.3", "--stack", "llamafactory", "-g", "8"],
        "kto-full": ["--model", "llava-1.5-7b", "--method", "full", "--stage", "kto", "--pref-ftx", "0.1",
                     "--stack", "llamafactory", "--num-gpus", "8", "--zero", "2", "-g", "32"],
    }
    for path in sorted(examples.rglob("*.yaml")):
        cases[f"example-{path.parent.name}-{path.stem}"] = ["--from-llamafactory", str(path), "--gpu", "h100-80g",
                                                             "--num-gpus", "2", "-g", "16"]
    exported = {name: _export(tmp, name, args) for name, args in cases.items()}

    env = {**os.environ, "DISABLE_VERSION_CHECK": "1", "LLAMAFACTORY_VERBOSITY": "WARN",
           "VLPLAN_TEST_USE_CPU": "0" if _cuda() else "1", "TORCH_EXTENSIONS_DIR": str(tmp / "torch_extensions"),
           # one process of a distributed launch, as torchrun sets it (LLaMA-Factory: "Please use FORCE_TORCHRUN=1
           # to launch DeepSpeed training" otherwise)
           "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    result = subprocess.run([sys.executable, "-c", PARSE, *(str(path) for path, _ in exported.values())],
                            capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    by_path = {line["path"]: line for line in lines}
    return {"tmp": tmp, "own": own, "cases": {name: (data, path, by_path[str(path)])
                                               for name, (path, data) in exported.items()}}


# A parse that stops only because this machine lacks what the file asks for (a package, a bf16 GPU)
ENVIRONMENT_ERRORS = ("liger-kernel", "liger_kernel", "does not support `pure_bf16`")


def test_llamafactory_parses_every_exported_yaml(parsed):
    templates = _templates()
    assert {"qwen2_vl", "llava", "qwen3_vl_nothink"} <= templates  # the ast read found the registry
    checked = 0
    for name, (plan_data, path, got) in parsed["cases"].items():
        if "error" in got:
            assert any(e in got["error"] for e in ENVIRONMENT_ERRORS), f"{name}: {got['error']}"
            continue
        checked += 1
        assert got["micro_batch"] == plan_data["micro_batch_size"], name
        assert got["accumulation"] == plan_data["gradient_accumulation_steps"], name
        assert got["gradient_checkpointing"] == plan_data["gradient_checkpointing"], name
        fsdp = plan_data.get("sharding") == "fsdp"
        uses_deepspeed = not fsdp and (plan_data["zero_stage"] > 0 or plan_data["offload"] != "none")
        if fsdp:  # launched by accelerate with the FSDP config written next to the YAML
            assert got["deepspeed"] is None, name
            assert (path.parent / f"fsdp2_{plan_data['fsdp']}{'_offload' if plan_data['offload'] == 'all' else ''}"
                    ".yaml").is_file(), name
        elif uses_deepspeed:
            assert Path(got["deepspeed"]).is_file() and Path(got["deepspeed"]).parent == path.parent, name
        else:
            assert got["deepspeed"] is None, name
        # a file that trains: a dataset, an output folder, a learning rate and a known chat template
        assert got["dataset"] and got["output_dir"] and got["learning_rate"] > 0, name
        if name == "no-template":
            assert got["template"] not in templates  # a marked placeholder LLaMA-Factory stops on, not a guess
            assert "FILL IN" in path.read_text()
        else:
            assert got["template"] in templates, name
    assert checked >= 8
    oft = parsed["cases"]["oft"][2]
    assert (oft["finetuning_type"], oft["oft_rank"], oft["oft_block_size"], oft["lora_target"]) == (
        "oft", 16, 0, ["q_proj", "v_proj"])
    assert "error" not in parsed["cases"]["fsdp-qlora"][2] and "error" not in parsed["cases"]["fsdp-auto-full"][2]
    assert parsed["cases"]["fsdp-auto-full"][0]["sharding"] == "fsdp"


def test_preference_stages_reach_llamafactory(parsed):
    """--stage dpo and its keys (pref_loss, pref_beta, pref_ftx), --stage kto and its keys (pref_beta, pref_ftx,
    kto_chosen_weight, kto_rejected_weight) are what LLaMA-Factory's parser reads back (and vlplan reads the exported
    files back to the same settings), and LLaMA-Factory's own DPO example keeps its stage."""
    cases = parsed["cases"]
    assert {k: cases["dpo-full"][2][k] for k in ("stage", "pref_loss", "pref_beta")} == dict(
        stage="dpo", pref_loss="sigmoid", pref_beta=0.2)
    assert {k: cases["orpo-lora"][2][k] for k in ("stage", "pref_loss", "pref_ftx")} == dict(
        stage="dpo", pref_loss="orpo", pref_ftx=0.5)
    fields = ("stage", "pref_beta", "pref_ftx", "kto_chosen_weight", "kto_rejected_weight")
    assert {k: cases["kto-lora"][2][k] for k in fields} == dict(
        stage="kto", pref_beta=0.3, pref_ftx=0.0, kto_chosen_weight=1.5, kto_rejected_weight=0.75)
    assert {k: cases["kto-full"][2][k] for k in (*fields, "finetuning_type")} == dict(
        stage="kto", pref_beta=0.1, pref_ftx=0.1, kto_chosen_weight=1.0, kto_rejected_weight=1.0,
        finetuning_type="full")
    # the placeholder dataset is an entry of LLaMA-Factory's dataset_info.json in the stage's format (planner/io/
    # llamafactory.py DEMO_DATASETS): its preference sets for dpo and kto, not the SFT demo those stages refuse
    assert [cases[name][2]["dataset"] for name in ("dpo-full", "orpo-lora", "kto-lora")] == [
        ["rlhf_v"], ["rlhf_v"], ["kto_en_demo"]]
    # the exported file read back by vlplan: the same setup (the round trip)
    for name in ("kto-lora", "kto-full"):
        plan_data, path, _ = cases[name]
        back = runner.invoke(app, ["estimate", "--from-llamafactory", str(path), "--json"])
        assert back.exit_code == 0, back.output
        settings = json.loads(back.stdout)["settings"]
        assert {k: settings[k] for k in fields} == {k: plan_data["settings"][k] for k in fields}, name
    example = cases["example-train_lora-qwen2_5vl_lora_dpo"][2]
    assert "error" not in example and (example["stage"], example["pref_loss"]) == ("dpo", "sigmoid")


def test_a_users_own_file_keeps_its_run_keys(parsed):
    """--from-llamafactory: the dataset, template, output folder, learning rate, schedule, steps, logging and saving
    of the user's file reach LLaMA-Factory unchanged; the plan's numbers replace the batch keys."""
    own = parsed["own"]
    plan_data, path, got = parsed["cases"]["own"]
    assert "error" not in got, got
    assert got["model"] == own["model_name_or_path"]  # the local folder, not a hub id
    assert got["dataset"] == ["tiny"] and got["dataset_dir"] == own["dataset_dir"]
    info = json.loads((Path(own["dataset_dir"]) / "dataset_info.json").read_text())
    assert set(got["dataset"]) <= set(info)
    assert got["template"] == "qwen2_vl" and got["output_dir"] == own["output_dir"]
    assert got["learning_rate"] == 5.0e-3 and got["max_steps"] == 3
    assert got["lr_scheduler_type"].lower().endswith("constant")
    assert got["logging_steps"] == 1 and got["save_steps"] == 2
    assert got["warmup_steps"] == 0.05  # warmup_ratio, which transformers 5.2 removed, as a warmup_steps ratio
    assert got["image_max_pixels"] == own["image_max_pixels"] and got["cutoff_len"] == own["cutoff_len"]
    assert got["micro_batch"] * got["accumulation"] == 4 == plan_data["global_batch_size"]
    exported = yaml.safe_load(path.read_text())
    assert "FILL IN" not in path.read_text()
    for key, value in own.items():
        if key not in ("per_device_train_batch_size", "gradient_accumulation_steps", "warmup_ratio"):
            assert exported[key] == value, key


def test_example_files_keep_every_key_the_plan_does_not_decide(parsed):
    from vlplan.planner.io.llamafactory import llamafactory_keys

    latest = llamafactory_keys("latest")
    owned = {"per_device_train_batch_size", "gradient_accumulation_steps", "deepspeed",
             "disable_gradient_checkpointing", "flash_attn", "fsdp", "gradient_checkpointing", "warmup_ratio"}
    for name, (_, path, _) in parsed["cases"].items():
        if not name.startswith("example-"):
            continue
        source = next((parsed["tmp"] / "examples").rglob(f"{name.split('-', 2)[2]}.yaml"))
        before, after = yaml.safe_load(source.read_text()), yaml.safe_load(path.read_text())
        for key, value in before.items():
            if key in owned:
                continue
            if key not in latest and key in ("image_resolution", "video_resolution", "train_mm_proj_only"):
                assert key not in after, (name, key)  # v0.9.1 names, written in the current ones
                continue
            # kept as it was, or set by the plan to the same setting (bf16 stays bf16, lora_dropout stays)
            assert key in after, (name, key)
            if key in ("dataset", "template", "output_dir", "learning_rate", "num_train_epochs", "stage",
                       "model_name_or_path", "lora_rank", "cutoff_len", "upcast_lmhead_output", "use_unsloth_gc"):
                assert after[key] == value, (name, key)
