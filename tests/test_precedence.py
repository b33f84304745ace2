"""A flag the user typed always wins over the config files, whatever its value (its library default included).

Each setup flag is typed over a LLaMA-Factory YAML (or a DeepSpeed JSON) that sets the opposite, and the resolved
setup (`vlplan estimate --json`'s settings) must hold the flag's value. A new setup flag fails
`test_every_setup_flag_has_a_case` until it gets a case here.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vlplan.cli.main import app
from vlplan.cli.options import FILE_OPTIONS, SETUP_OPTION_NAMES

MODEL = "qwen2.5-vl-7b"
BASE = {"model_name_or_path": MODEL, "finetuning_type": "lora", "bf16": True}

# option -> (YAML keys over BASE, flags typed, {setting: expected value in `estimate --json`'s settings})
CASES = {
    "model": ({}, ["--model", "qwen2.5-vl-3b"], {"model": "qwen2.5-vl-3b"}),
    "method": ({"finetuning_type": "full"}, ["--method", "lora"], {"method": "lora", "language": "lora"}),
    "lora_rank": ({"lora_rank": 16}, ["--lora-rank", "8"], {"lora.rank": 8}),
    "lora_alpha": ({"lora_alpha": 64}, ["--lora-alpha", "16"], {"lora.alpha": 16}),
    "lora_target": ({"lora_target": "q_proj,v_proj"}, ["--lora-target", "all"], {"lora.targets": ["all"]}),
    "lora_dropout": ({"lora_dropout": 0.1}, ["--lora-dropout", "0"], {"lora.dropout": 0.0}),
    "dora": ({"use_dora": False}, ["--dora"], {"lora.dora": True}),
    "oft_rank": ({"finetuning_type": "oft", "oft_rank": 8, "oft_block_size": 0}, ["--oft-rank", "4"],
                 {"oft.rank": 4, "method": "oft"}),
    "oft_block_size": ({"finetuning_type": "oft", "oft_block_size": 16}, ["--oft-block-size", "32"],
                       {"oft.block_size": 32}),
    "module_dropout": ({"finetuning_type": "oft", "module_dropout": 0.1}, ["--module-dropout", "0"],
                       {"oft.module_dropout": 0.0}),
    "train_vision": ({"freeze_vision_tower": True}, ["--train-vision"], {"vision": "lora"}),
    "freeze_vision": ({"freeze_vision_tower": False}, ["--freeze-vision"], {"vision": "frozen"}),
    "train_projector": ({"finetuning_type": "full", "freeze_multi_modal_projector": True},
                        ["--train-projector"], {"projector": "full"}),
    "freeze_projector": ({"finetuning_type": "full", "freeze_multi_modal_projector": False},
                         ["--freeze-projector"], {"projector": "frozen"}),
    "freeze_llm": ({"freeze_language_model": False, "finetuning_type": "full", "freeze_multi_modal_projector": False},
                   ["--freeze-llm"], {"language": "frozen"}),
    "train_llm": ({"freeze_language_model": True, "finetuning_type": "full", "freeze_multi_modal_projector": False},
                  ["--train-llm"], {"language": "full"}),
    "freeze_trainable_layers": ({"finetuning_type": "freeze", "freeze_trainable_layers": 4},
                                ["--freeze-trainable-layers", "2"], {"freeze_trainable_layers": 2}),
    "precision": ({"bf16": False, "fp16": True}, ["--precision", "bf16"], {"precision": "bf16"}),
    "quant_bits": ({"quantization_bit": 8}, ["--quant-bits", "4"], {"quant_bits": 4, "method": "qlora"}),
    "optimizer": ({"optim": "sgd"}, ["--optimizer", "adamw"], {"optimizer": "adamw"}),
    "seq_len": ({"cutoff_len": 4096}, ["--seq-len", "2048"], {"seq_len": 2048}),
    "batch_size": ({"per_device_train_batch_size": 4}, ["--batch-size", "1"], {"batch_size": 1}),
    "gradient_accumulation_steps": ({"gradient_accumulation_steps": 8}, ["--gradient-accumulation-steps", "1"],
                                    {"gradient_accumulation_steps": 1}),
    "images": ({}, ["--images", "2"], {"images": ["768x768", "768x768"]}),
    "image_size": ({}, ["--image-size", "448x448"], {"images": ["448x448"]}),
    "image_max_pixels": ({"image_max_pixels": 262144}, ["--image-max-pixels", "589824"],
                         {"image_max_pixels": 589824}),
    "image_min_pixels": ({"image_min_pixels": 4096}, ["--image-min-pixels", "1024"], {"image_min_pixels": 1024}),
    "attn": ({"flash_attn": "disabled"}, ["--attn", "sdpa"], {"attn": "sdpa"}),
    "gradient_checkpointing": ({"disable_gradient_checkpointing": True}, ["--gradient-checkpointing"],
                               {"gradient_checkpointing": True}),
    "gpu": ({}, ["--gpu", "a100-40g"], {"gpu": "a100-40g"}),
    "gpu_memory_gib": ({}, ["--gpu-memory-gib", "40"], {}),
    "num_gpus": ({"deepspeed": "DS"}, ["--num-gpus", "4"], {"num_gpus": 4}),
    "num_nodes": ({"deepspeed": "DS"}, ["--num-gpus", "4", "--num-nodes", "2"], {"num_nodes": 2}),
    "zero": ({"deepspeed": "DS", "finetuning_type": "full"}, ["--zero", "0", "--offload", "none"], {"zero": 0}),
    "offload": ({"deepspeed": "DS", "finetuning_type": "full"}, ["--offload", "none"],
                {"offload": "none", "zero": 3}),
    "sharding": ({"deepspeed": "DS", "finetuning_type": "full"},
                 ["--sharding", "fsdp", "--zero", "0", "--offload", "none", "--num-gpus", "2"],
                 {"sharding": "fsdp", "zero": 0}),
    "fsdp": ({"fsdp": "full_shard auto_wrap", "finetuning_type": "full"}, ["--fsdp", "shard_grad_op"],
             {"sharding": "fsdp", "fsdp": "shard_grad_op"}),
    "stack": ({}, ["--stack", "vlplan"], {"stack": "vlplan"}),
    # a LLaMA-Factory run on 2 GPUs launches through torchrun with expandable segments on; the typed flag wins
    "expandable_segments": ({}, ["--num-gpus", "2", "--no-expandable-segments"], {"expandable_segments": False}),
    "vision": ({"freeze_vision_tower": False}, ["--vision", "frozen"], {"vision": "frozen", "method": "lora"}),
    "projector": ({"freeze_multi_modal_projector": True}, ["--projector", "full"], {"projector": "full"}),
    "language": ({"finetuning_type": "lora"}, ["--language", "full"], {"language": "full", "method": "full"}),
    "vision_gradient_checkpointing": ({}, ["--stack", "vlplan", "--no-vision-gradient-checkpointing"],
                                      {"vision_gradient_checkpointing": False, "gradient_checkpointing": True}),
    "offload_checkpoints": ({"use_unsloth_gc": False}, ["--offload-checkpoints"], {"offload_checkpoints": True}),
    "liger_kernel": ({"enable_liger_kernel": True}, ["--no-liger-kernel"], {"liger_kernel": False}),
    "videos": ({}, ["--videos", "1", "--video-size", "640x360", "--video-frames", "16"],
               {"videos": ["640x360, 16 frames"]}),
    "video_size": ({}, ["--videos", "1", "--video-size", "320x240", "--video-frames", "8"],
                   {"videos": ["320x240, 8 frames"]}),
    "video_frames": ({}, ["--videos", "1", "--video-size", "640x360", "--video-frames", "4"],
                     {"videos": ["640x360, 4 frames"]}),
    "video_duration": ({}, ["--videos", "1", "--video-size", "640x360", "--video-duration", "4"],
                       {"videos": ["640x360, 4 s"]}),
    "video_max_pixels": ({"video_max_pixels": 16384}, ["--video-max-pixels", "65536"], {"video_max_pixels": 65536}),
    "video_min_pixels": ({"video_min_pixels": 1024}, ["--video-min-pixels", "256"], {"video_min_pixels": 256}),
    "video_fps": ({"video_fps": 1.0}, ["--video-fps", "2"], {"video_fps": 2.0}),
    "video_maxlen": ({"video_maxlen": 64}, ["--video-maxlen", "128"], {"video_maxlen": 128}),
    "packing": ({"packing": True}, ["--no-packing"], {"packing": False}),
    # LLaMA-Factory's neat_packing turns packing on; typed off, the mask goes and the YAML's packing stays
    "neat_packing": ({"neat_packing": True}, ["--no-neat-packing"], {"packing": True}),
    "stage": ({"stage": "dpo"}, ["--stage", "sft"], {"stage": "sft"}),
    "pref_loss": ({"stage": "dpo", "pref_loss": "orpo"}, ["--pref-loss", "sigmoid"], {"pref_loss": "sigmoid"}),
    "pref_ftx": ({"stage": "dpo", "pref_ftx": 0.5}, ["--pref-ftx", "0"], {"pref_ftx": 0.0}),
    "pref_beta": ({"stage": "dpo", "pref_beta": 0.5}, ["--pref-beta", "0.1"], {"pref_beta": 0.1}),
    "kto_chosen_weight": ({"stage": "kto", "kto_chosen_weight": 2.0}, ["--kto-chosen-weight", "1"],
                          {"kto_chosen_weight": 1.0}),
    "kto_rejected_weight": ({"stage": "kto", "kto_rejected_weight": 0.5}, ["--kto-rejected-weight", "1"],
                            {"kto_rejected_weight": 1.0}),
}
# the opposite of each flag's default, where the default itself is typed above
NEGATIONS = {
    "gradient_checkpointing": ({}, ["--no-gradient-checkpointing"], {"gradient_checkpointing": False}),
    "expandable_segments": ({}, ["--num-gpus", "2"], {"expandable_segments": True}),
}
DS_OFFLOAD_Z3 = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                       "offload_param": {"device": "cpu"}},
                 "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto"}


def test_every_setup_flag_has_a_case():
    flags = [name for name in SETUP_OPTION_NAMES if name not in FILE_OPTIONS]
    assert sorted(flags) == sorted(CASES)


def _setting(settings: dict, key: str):
    for part in key.split("."):
        settings = settings[part]
    return settings


@pytest.mark.parametrize("name", sorted(CASES) + [f"{n}:negation" for n in NEGATIONS])
def test_a_typed_flag_beats_the_yaml(name, tmp_path):
    import yaml

    yaml_keys, flags, expected = NEGATIONS[name.split(":")[0]] if ":" in name else CASES[name]
    (tmp_path / "ds.json").write_text(json.dumps(DS_OFFLOAD_Z3))
    config = {**BASE, **yaml_keys}
    if config.get("deepspeed") == "DS":
        config["deepspeed"] = str(tmp_path / "ds.json")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["estimate", "--from-llamafactory", str(path), *flags, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key, value in expected.items():
        assert _setting(data["settings"], key) == value, (key, data["settings"])
    if name == "gpu_memory_gib":
        assert data["gpu"]["memory_bytes"] == 40 * 2 ** 30


def test_a_flag_at_its_default_value_beats_the_deepspeed_json(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**DS_OFFLOAD_Z3, "train_micro_batch_size_per_gpu": 4, "fp16": {"enabled": True}}))
    result = CliRunner().invoke(app, ["estimate", "--model", MODEL, "--method", "full", "--deepspeed", str(path),
                                      "--batch-size", "1", "--precision", "bf16", "--json"])
    assert result.exit_code == 0, result.output
    settings = json.loads(result.stdout)["settings"]
    assert (settings["batch_size"], settings["precision"], settings["zero"]) == (1, "bf16", 3)


def test_lora_settings_of_a_yaml_go_with_a_typed_full_method(tmp_path):
    import yaml

    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({**BASE, "lora_rank": 64, "use_dora": True}))
    result = CliRunner().invoke(app, ["estimate", "--from-llamafactory", str(path), "--method", "full", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["method"] == "full"
