"""No setting is read and silently dropped.

For every field of `TrainSetup` (and of its `LoraSettings`): changing it changes the estimate, or the field is listed
in `planner/coverage.py` as not modelled (and every command that resolves a setup warns, naming it) or as without
effect by design (and it indeed changes nothing). A new field fails `test_every_field_is_accounted_for` until it
gets a case here or a line there. The same holds for LLaMA-Factory keys and DeepSpeed keys that vlplan reads: each
changes the resolved setup or is warned about.
"""

from __future__ import annotations

import json
from dataclasses import fields, replace

import pytest
from typer.testing import CliRunner

from vlplan.cli.main import app
from vlplan.planner.coverage import LLAMAFACTORY_NO_EFFECT, NO_EFFECT, NOT_MODELLED, setup_warnings
from vlplan.planner.io.llamafactory import NOT_MODELLED as LLAMAFACTORY_NOT_MODELLED
from vlplan.planner.io.llamafactory import SETUP_KEYS as LLAMAFACTORY_READ
from vlplan.planner.io.llamafactory import llamafactory_choices
from vlplan.planner.memory.estimate import estimate
from vlplan.planner.registry import resolve
from vlplan.planner.setup import LoraSettings, OftSettings, TrainSetup, make_setup
from vlplan.planner.video import Video

MODEL = "qwen2.5-vl-7b"
FULL = dict(method="full")
# a sample with a 20 s clip of 600 frames whose vision tower trains (its activations are held for backward)
CLIP = dict(train_vision=True, seq_len=8192, videos=(Video(640, 360, frames=600, duration_s=20.0),))
TINY_CLIP = dict(train_vision=True, videos=(Video(32, 32, frames=4),))
DPO = dict(stack="llamafactory", stage="dpo")
KTO = dict(stack="llamafactory", stage="kto")

# field -> (make_setup kwargs of the base setup, kwargs of the changed one); the changed setup must differ in that field
CASES = {
    "model": ({}, dict(model="qwen2.5-vl-3b")),
    "method": ({}, FULL),
    "vision": ({}, dict(train_vision=True)),
    "projector": ({}, dict(train_projector=True)),
    "language": (dict(train_projector=True), dict(train_projector=True, freeze_llm=True)),
    "lora.rank": ({}, dict(lora_rank=16)),
    "lora.targets": ({}, dict(lora_target="q_proj,v_proj")),
    "lora.dora": ({}, dict(dora=True)),
    "lora.dropout": (dict(gradient_checkpointing=False), dict(gradient_checkpointing=False, lora_dropout=0.05)),
    "oft.rank": (dict(method="oft"), dict(method="oft", oft_rank=8)),
    "oft.block_size": (dict(method="oft"), dict(method="oft", oft_block_size=16)),
    "freeze_trainable_layers": (dict(method="freeze"), dict(method="freeze", freeze_trainable_layers=4)),
    "precision": ({}, dict(precision="fp32")),
    "quant_bits": (dict(method="qlora"), dict(method="qlora", quant_bits=8)),
    "optimizer": (FULL, dict(FULL, optimizer="sgd")),
    "seq_len": ({}, dict(seq_len=4096)),
    "batch_size": ({}, dict(batch_size=2)),
    "gradient_accumulation_steps": (dict(FULL, gradient_checkpointing=False),
                                    dict(FULL, gradient_checkpointing=False, gradient_accumulation_steps=2)),
    "images": ({}, dict(image_size=(448, 448))),
    "image_max_pixels": ({}, dict(image_max_pixels=512 * 512)),
    "image_min_pixels": (dict(image_size=(64, 64)), dict(image_size=(64, 64), image_min_pixels=256 * 256)),
    "videos": (dict(seq_len=8192), dict(seq_len=8192, videos=(Video(640, 360, frames=600, duration_s=20.0),))),
    "video_max_pixels": (CLIP, dict(CLIP, video_max_pixels=512 * 512)),
    "video_min_pixels": (TINY_CLIP, dict(TINY_CLIP, video_min_pixels=128 * 128)),
    "video_fps": (CLIP, dict(CLIP, video_fps=1.0)),
    "video_maxlen": (CLIP, dict(CLIP, video_maxlen=32)),
    "neat_packing": (dict(packing=True, seq_len=8192), dict(packing=True, neat_packing=True, seq_len=8192)),
    "attn": ({}, dict(attn="eager")),
    "gradient_checkpointing": ({}, dict(gradient_checkpointing=False)),
    "stack": ({}, dict(stack="llamafactory")),
    "expandable_segments": ({}, dict(expandable_segments=True)),
    "gpu": ({}, dict(gpu="a100-40g")),
    "num_gpus": (dict(FULL, zero=3), dict(FULL, zero=3, num_gpus=4)),
    "num_nodes": (dict(FULL, zero=3, num_gpus=4), dict(FULL, zero=3, num_gpus=4, num_nodes=2)),
    "zero": (dict(FULL, num_gpus=2), dict(FULL, num_gpus=2, zero=2)),
    "offload": (dict(FULL, zero=3), dict(FULL, zero=3, offload="optimizer")),
    "max_grad_norm": (FULL, dict(FULL, max_grad_norm=0.0)),
    "ds_reduce_bucket_size": (dict(FULL, zero=2, num_gpus=2), dict(FULL, zero=2, num_gpus=2,
                                                                     ds_reduce_bucket_size=10 ** 9)),
    "ds_overlap_comm": (dict(FULL, zero=2, num_gpus=2), dict(FULL, zero=2, num_gpus=2, ds_overlap_comm=True)),
    "sharding": (dict(FULL, num_gpus=2), dict(FULL, num_gpus=2, sharding="fsdp")),
    "fsdp": (dict(FULL, num_gpus=2, sharding="fsdp"), dict(FULL, num_gpus=2, sharding="fsdp", fsdp="shard_grad_op")),
    # modelled for LLaVA and Qwen2(.5)-VL under LLaMA-Factory's stack (planner/memory/liger.py); elsewhere it warns
    "vision_gradient_checkpointing": (dict(FULL, train_vision=True),
                                      dict(FULL, train_vision=True, vision_gradient_checkpointing=False)),
    "offload_checkpoints": (dict(stack="llamafactory"), dict(stack="llamafactory", offload_checkpoints=True)),
    "stage": (dict(stack="llamafactory"), dict(stack="llamafactory", stage="dpo")),
    "pref_loss": (dict(stack="llamafactory", stage="dpo"), dict(stack="llamafactory", stage="dpo", pref_loss="orpo")),
    "liger_kernel": (dict(model="llava-1.5-7b", stack="llamafactory"),
                     dict(model="llava-1.5-7b", stack="llamafactory", liger_kernel=True)),
}
# fields listed as without effect or not modelled: a setting where it is set, to check it changes nothing
QUIET_CASES = {
    "lora.alpha": dict(lora_alpha=64),
    "oft.module_dropout": (dict(method="oft"), dict(method="oft", module_dropout=0.1)),
    "packing": dict(packing=True),
    # (base, changed) where the field means something only next to others
    "pref_beta": (DPO, dict(DPO, pref_beta=0.5)),
    "pref_ftx": (DPO, dict(DPO, pref_ftx=1.0)),
    "kto_chosen_weight": (KTO, dict(KTO, kto_chosen_weight=2.0)),
    "kto_rejected_weight": (KTO, dict(KTO, kto_rejected_weight=0.5)),
}
NO_EFFECT_FIELDS = {**NO_EFFECT, "lora.alpha": "LoRA's scaling (alpha / rank) is a Python scalar"}


def _field_names() -> list[str]:
    names = []
    for f in fields(TrainSetup):
        if f.name == "lora":
            names += [f"lora.{g.name}" for g in fields(LoraSettings)]
        elif f.name == "oft":
            names += [f"oft.{g.name}" for g in fields(OftSettings)]
        else:
            names.append(f.name)
    return names


def _setup(kwargs: dict) -> TrainSetup:
    kwargs = dict(kwargs)
    return make_setup(resolve(kwargs.pop("model", MODEL)), **kwargs)


def _value(setup: TrainSetup, name: str):
    obj = setup
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _numbers(setup: TrainSetup) -> tuple:
    """Everything an estimate answers: peak, breakdown per term and phase, host RAM, parameters, and the verdict."""
    e = estimate(setup)
    return (e.peak_bytes, e.allocated_peak_bytes, e.peak_phase, tuple(sorted(e.breakdown_bytes.items())),
            tuple(sorted(e.phase_allocated_bytes.items())), e.cpu_ram_bytes, tuple(sorted(e.params.items())),
            tuple(sorted(e.trainable_params.items())), setup.gpu.memory_bytes, e.fits)


def test_every_field_is_accounted_for():
    accounted = set(CASES) | set(NOT_MODELLED) | set(NO_EFFECT_FIELDS)
    missing = [name for name in _field_names() if name not in accounted]
    assert not missing, (f"TrainSetup field(s) {missing}: add a case to CASES (the estimate reads it) or list it in "
                         "planner/coverage.py (NOT_MODELLED warns, NO_EFFECT explains)")
    stale = accounted - set(_field_names())
    assert not stale, f"listed but not a TrainSetup field: {stale}"
    assert not set(CASES) & (set(NOT_MODELLED) | set(NO_EFFECT_FIELDS))


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_modelled_field_changes_the_estimate(name):
    before, after = (_setup(kwargs) for kwargs in CASES[name])
    assert _value(before, name) != _value(after, name), f"the case for {name} does not change {name}"
    assert _numbers(before) != _numbers(after), f"{name} is read but changes nothing in the estimate"


@pytest.mark.parametrize("name", sorted(QUIET_CASES))
def test_a_listed_field_changes_nothing_and_a_not_modelled_one_warns(name):
    assert name in NOT_MODELLED or name in NO_EFFECT_FIELDS
    case = QUIET_CASES[name]  # the changed setup's kwargs, or (base kwargs, changed kwargs)
    base, changed = (_setup(case[0]), _setup(case[1])) if isinstance(case, tuple) else (_setup({}), _setup(case))
    assert _value(base, name) != _value(changed, name)
    # a field that starts to change the estimate must leave the lists (and get a case in CASES)
    assert _numbers(base) == _numbers(changed), f"{name} changes the estimate: move it to CASES"
    warnings = setup_warnings(changed)
    if name in NOT_MODELLED:
        assert [w for w in warnings if w.startswith(f"{name} = ")], warnings
    else:
        assert not warnings


def test_every_not_modelled_field_has_a_quiet_case():
    assert set(NOT_MODELLED) | set(NO_EFFECT_FIELDS) == set(QUIET_CASES)


@pytest.mark.parametrize("command", [
    ["estimate", "--json"],
    ["plan", "--global-batch-size", "8", "--json"],
])
def test_commands_warn_about_a_not_modelled_setting(tmp_path, command):
    config = tmp_path / "train.yaml"
    # PaliGemma: liger's patch fails at its first step on the modelled versions, so Liger is not modelled there
    config.write_text("model_name_or_path: paligemma2-3b\nfinetuning_type: lora\nbf16: true\nenable_liger_kernel: true\n")
    result = CliRunner().invoke(app, [*command, "--from-llamafactory", str(config)])
    assert result.exit_code == 0, result.output
    assert "warning: liger_kernel = True: Liger kernels" in result.stderr
    assert any(w.startswith("liger_kernel") for w in json.loads(result.stdout)["warnings"])


@pytest.mark.slow
def test_trace_warns_about_a_not_modelled_setting(tmp_path):
    pytest.importorskip("transformers")
    config = tmp_path / "train.yaml"
    config.write_text("model_name_or_path: qwen2-vl-2b\nbf16: true\nenable_liger_kernel: true\ncutoff_len: 256\n")
    result = CliRunner().invoke(app, ["trace", "--from-llamafactory", str(config), "--layers", "1",
                                      "--image-size", "112x112", "--json"])
    assert result.exit_code == 0, result.output
    assert "warning: liger_kernel = True" in result.stderr


# LLaMA-Factory and DeepSpeed keys ---------------------------------------------------------------------------------
# A value for each key vlplan reads, other than LLaMA-Factory's default, valid with BASE_YAML
LLAMAFACTORY_VALUES = {
    "model_name_or_path": "qwen2.5-vl-3b", "stage": "dpo", "finetuning_type": "full", "lora_rank": 16,
    "lora_alpha": 64, "lora_dropout": 0.1, "lora_target": "q_proj", "use_dora": True, "freeze_trainable_layers": 4,
    "freeze_vision_tower": False, "freeze_multi_modal_projector": False, "freeze_language_model": True,
    "train_mm_proj_only": True, "image_max_pixels": 262144, "image_min_pixels": 4096, "image_resolution": 512,
    "video_max_pixels": 131072, "video_min_pixels": 1024, "video_resolution": 256, "video_fps": 1.0,
    "video_maxlen": 32, "cutoff_len": 1024, "packing": True, "neat_packing": True, "quantization_bit": 4,
    "quantization_method": "hqq", "quantization_type": "fp4", "double_quantization": False,
    "quantization_device_map": "auto", "pure_bf16": True, "bf16": True, "fp16": True, "optim": "sgd",
    "flash_attn": "disabled", "disable_gradient_checkpointing": True, "gradient_checkpointing": False,
    "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "max_grad_norm": 0.5,
    "use_unsloth_gc": True, "deepspeed": "ds_z3_config.json", "fsdp": "full_shard", "enable_liger_kernel": True, "use_liger_kernel": True,
    "additional_target": "lm_head", "use_reentrant_gc": False, "oft_rank": 8, "oft_block_size": 16,
    "module_dropout": 0.1, "oft_target": "q_proj", "pref_beta": 0.2, "pref_ftx": 0.5, "pref_loss": "orpo",
    "ref_model": "Qwen/Qwen2.5-VL-7B-Instruct", "ld_alpha": 0.5, "kto_chosen_weight": 1.5, "kto_rejected_weight": 0.5,
}
# keys that only mean something next to another key (the YAML gets both)
COMPANIONS = {
    "quantization_method": {"quantization_bit": 4}, "quantization_type": {"quantization_bit": 4},
    "double_quantization": {"quantization_bit": 4}, "train_mm_proj_only": {"finetuning_type": "full"},
    "freeze_trainable_layers": {"finetuning_type": "freeze"}, "freeze_multi_modal_projector": {
        "finetuning_type": "full"}, "freeze_language_model": {"freeze_multi_modal_projector": False},
    "fp16": {"bf16": False}, "oft_rank": {"finetuning_type": "oft", "oft_block_size": 0},
    "oft_block_size": {"finetuning_type": "oft"}, "module_dropout": {"finetuning_type": "oft"},
    "oft_target": {"finetuning_type": "oft"},
    "pref_beta": {"stage": "dpo"}, "pref_ftx": {"stage": "dpo"}, "pref_loss": {"stage": "dpo"},
    "ref_model": {"stage": "dpo"}, "ld_alpha": {"stage": "dpo"},
    "kto_chosen_weight": {"stage": "kto"}, "kto_rejected_weight": {"stage": "kto"},
}
BASE_YAML = {"model_name_or_path": MODEL, "finetuning_type": "lora", "bf16": True}


def _resolve_yaml(config: dict):
    """(setup described, warnings), or the one-line error a key raises (refused is fine: never dropped)."""
    from vlplan.planner.errors import VlplanError
    from vlplan.planner.io.llamafactory import build_setup

    try:
        choices, warnings = llamafactory_choices(config)
        setup = build_setup(choices)
    except VlplanError as err:
        return None, [str(err)]
    return setup.describe(), warnings + setup_warnings(setup)


def test_every_read_llamafactory_key_has_a_value():
    assert set(LLAMAFACTORY_READ) == set(LLAMAFACTORY_VALUES)


@pytest.mark.parametrize("key", sorted(LLAMAFACTORY_VALUES))
def test_a_read_llamafactory_key_changes_the_setup_or_is_named(key, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds_z3_config.json").write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {
        "enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto"}))
    base = {**BASE_YAML, **COMPANIONS.get(key, {})}
    base.pop(key, None)
    changed = {**base, key: LLAMAFACTORY_VALUES[key]}
    before, before_warnings = _resolve_yaml(base)
    after, warnings = _resolve_yaml(changed)
    named = [w for w in warnings if key in w or "liger" in w and "liger" in key]
    if key in LLAMAFACTORY_NO_EFFECT:
        assert (before, warnings) == (after, before_warnings), f"{key} has an effect: take it off LLAMAFACTORY_NO_EFFECT"
        return
    assert before != after or named or warnings != before_warnings, (
        f"{key}: {LLAMAFACTORY_VALUES[key]!r} changes nothing and warns nothing")


def test_not_modelled_llamafactory_keys_warn():
    for key in LLAMAFACTORY_NOT_MODELLED:
        if not LLAMAFACTORY_NOT_MODELLED[key]:
            continue
        _, warnings = _resolve_yaml({**BASE_YAML, key: True})
        assert any(key in w for w in warnings), key


def test_replace_keeps_the_contract():
    # dataclasses.replace re-validates: the contract holds for setups built either way
    setup = _setup({})
    assert _numbers(replace(setup, liger_kernel=True)) == _numbers(setup)


# DeepSpeed keys vlplan reads: each changes the resolved setup or is warned about (or refused in one line)
DEEPSPEED_BASE = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"},
                  "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
DEEPSPEED_VALUES = {
    "zero_optimization.stage": 3,
    "zero_optimization.offload_optimizer": {"device": "cpu"},
    "zero_optimization.offload_param": {"device": "cpu"},
    "zero_optimization.reduce_bucket_size": 10 ** 8,
    "zero_optimization.overlap_comm": True,
    "zero_optimization.zero_quantized_weights": True,
    "zero_optimization.zero_quantized_gradients": True,
    "zero_optimization.zero_hpz_partition_size": 8,
    "zero_optimization.stage3_max_live_parameters": 10 ** 8,
    "zero_optimization.stage3_prefetch_bucket_size": 5 * 10 ** 8,
    "optimizer": {"type": "Lamb", "params": {"lr": 1e-4}},
    "tensor_parallel": {"autotp_size": 2},
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 8,
    "gradient_clipping": 0.5,
    "bf16": {"enabled": False},
    "fp16": {"enabled": True},
}


def _with(config: dict, dotted: str, value) -> dict:
    config = json.loads(json.dumps(config))
    *parents, key = dotted.split(".")
    block = config
    for parent in parents:
        block = block.setdefault(parent, {})
    block[key] = value
    if dotted == "zero_optimization.offload_param":
        config["zero_optimization"]["stage"] = 3
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return config


@pytest.mark.parametrize("key", sorted(DEEPSPEED_VALUES))
def test_a_read_deepspeed_key_changes_the_setup_or_is_named(key, tmp_path):
    def resolve_json(config: dict):
        path = tmp_path / f"ds{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps(config))
        result = CliRunner().invoke(app, ["estimate", "--model", MODEL, "--method", "full", "--num-gpus", "2",
                                          "--deepspeed", str(path), "--json"])
        if result.exit_code == 2:
            return None, [result.stderr]
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        return data["settings"], data["warnings"]

    base = _with(DEEPSPEED_BASE, "zero_optimization.stage", 3) if ".stage3_" in key else DEEPSPEED_BASE
    before, before_warnings = resolve_json(base)
    after, warnings = resolve_json(_with(base, key, DEEPSPEED_VALUES[key]))
    named = [w for w in warnings if key.rsplit(".", 1)[-1] in w]
    assert before != after or named or warnings != before_warnings, f"{key} changes nothing and warns nothing"
