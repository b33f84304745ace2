"""LLaMA-Factory YAML import and export: fixtures of several versions, defaults, round trips, and every exported key
accepted by LLaMA-Factory's parser (its documented key set plus transformers' TrainingArguments fields)."""

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import yaml

from vlplan.planner.errors import VlplanError
from vlplan.planner.io.deepspeed import deepspeed_config
from vlplan.planner.io.llamafactory import (FLASH_ATTN, QUANTIZATION_METHODS, QUANTIZATION_METHODS_OLD, VERSIONS,
                                            detect_version, dump_yaml, llamafactory_keys, llamafactory_yaml,
                                            setup_from_llamafactory)
from vlplan.planner.registry import resolve
from vlplan.planner.setup import Train, make_setup

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory" / "examples"
ALL_FIXTURES = sorted(FIXTURES.rglob("*.yaml"))


def load(relative: str, **overrides):
    return setup_from_llamafactory(FIXTURES / relative, **overrides)


# Import: what each fixture means --------------------------------------------------------------------------------------
def test_current_lora_example():
    setup, warns = load("train_lora/qwen2_5vl_lora_sft.yaml")
    assert setup.model.name == "qwen2.5-vl-7b" and setup.method == "lora"
    assert (setup.vision, setup.projector, setup.language) == (Train.FROZEN, Train.FROZEN, Train.LORA)
    assert (setup.lora.rank, setup.lora.alpha, setup.lora.targets) == (8, 16, ("all",))
    assert (setup.seq_len, setup.batch_size, setup.gradient_accumulation_steps) == (2048, 1, 8)
    assert (setup.image_max_pixels, setup.image_min_pixels, setup.video_max_pixels) == (262144, 1024, 16384)
    assert (setup.precision, setup.optimizer, setup.attn, setup.gradient_checkpointing) == ("bf16", "adamw", "sdpa",
                                                                                          True)
    assert setup.images == ((512, 512),)  # one image at the cap, as make_setup's default
    assert warns == []  # every key is either read or known to be irrelevant to memory


def test_full_example_reads_its_deepspeed_file():
    setup, warns = load("train_full/qwen2_5vl_full_sft.yaml")
    assert setup.method == "full" and setup.language is Train.FULL and setup.vision is Train.FROZEN
    assert (setup.zero, setup.offload, setup.ds_reduce_bucket_size, setup.ds_overlap_comm) == (3, "none", None, False)
    assert warns == []


def test_qlora_dora_vision_lora_and_projector():
    setup, warns = load("train_qlora/qwen2vl_lora_sft_otfq.yaml")
    assert (setup.method, setup.quant_bits, setup.lora.dora, setup.lora.dropout) == ("qlora", 4, True, 0.05)
    assert (setup.lora.rank, setup.lora.alpha) == (16, 16)
    assert (setup.vision, setup.projector, setup.language) == (Train.LORA, Train.FULL, Train.LORA)
    assert (setup.optimizer, setup.attn, setup.image_min_pixels) == ("paged-adamw-8bit", "fa2", 3136)
    assert any("double_quantization" in w for w in warns)


def test_freeze_with_unmodelled_knobs_warns_each():
    setup, warns = load("train_full/llava1_5_freeze_misc.yaml")
    assert (setup.method, setup.freeze_trainable_layers, setup.precision) == ("freeze", 4, "fp16")
    assert setup.batch_size == 8  # HF TrainingArguments default when the key is missing
    # DataArguments lowers cutoff_len by one with packing and pads each packed row to that + 1: the YAML's cutoff_len
    assert (setup.packing, setup.seq_len) == (True, 1024)
    assert (setup.liger_kernel, setup.gradient_checkpointing, setup.attn) == (True, False, "eager")
    assert (setup.optimizer, setup.max_grad_norm) == ("adamw-foreach", 0.5)
    assert (setup.zero, setup.offload, setup.ds_reduce_bucket_size) == (2, "optimizer", 500_000_000)
    for needle in ("per_device_train_batch_size is missing", "upcast_lmhead_output", "use_unsloth_gc"):
        assert any(needle in w for w in warns), needle
    assert not any("liger" in w for w in warns)  # LLaVA's fused loss is modelled (planner/memory/liger.py)


def test_v0_9_1_projector_pretraining():
    setup, warns = load("v0_9_1/llava1_5_pretrain_mm_proj.yaml")
    assert (setup.vision, setup.projector, setup.language) == (Train.FROZEN, Train.FULL, Train.FROZEN)
    assert (setup.image_max_pixels, setup.image_min_pixels, setup.video_max_pixels) == (262144, None, 16384)
    assert setup.video_maxlen == 64  # v0.9.1 default
    # ds_z2_config.json is not shipped with the fixture: inferred from LLaMA-Factory's file name, with a warning
    assert (setup.zero, setup.offload, setup.ds_reduce_bucket_size) == (2, "none", 500_000_000)
    assert any("v0.9.1" in w for w in warns) and any("not found; assumed" in w for w in warns)


def test_v0_9_2_bitsandbytes_name_and_8bit():
    setup, warns = load("v0_9_2/qwen2vl_qlora.yaml")
    assert (setup.method, setup.quant_bits, setup.optimizer) == ("qlora", 8, "adamw-8bit")
    assert setup.lora.targets == ("q_proj", "v_proj") and setup.lora.alpha == 128
    assert detect_version(yaml.safe_load((FIXTURES / "v0_9_2/qwen2vl_qlora.yaml").read_text()))[0] == "0.9.2"


def test_v0_9_0_side_length_and_defaults():
    setup, warns = load("v0_9_0/qwen2vl_lora_sft.yaml")
    assert setup.image_max_pixels == 512 * 512 and setup.seq_len == 1024  # v0.9.0 cutoff_len default
    assert any("caps the longer side" in w for w in warns)


def test_overrides_and_missing_keys_take_defaults():
    setup, _ = setup_from_llamafactory({"model_name_or_path": "qwen2-vl-2b", "per_device_train_batch_size": 1,
                                        "bf16": True}, images=[(1920, 1080)], num_gpus=4, gpu="a100-80g")
    assert (setup.method, setup.lora.rank, setup.lora.alpha, setup.seq_len) == ("lora", 8, 16, 2048)
    assert (setup.images, setup.num_gpus, setup.gpu.name) == (((1920, 1080),), 4, "a100-80g")
    assert (setup.vision, setup.projector) == (Train.FROZEN, Train.FROZEN)  # freeze_* default true
    # a rank override keeps LLaMA-Factory's alpha = 2 * rank when the YAML has no lora_alpha
    assert setup_from_llamafactory({"model_name_or_path": "qwen2-vl-2b"}, lora_rank=32)[0].lora.alpha == 64


def test_model_from_local_config_dir(tmp_path):
    from vlplan.planner.hf_config import spec_to_hf_config

    (tmp_path / "config.json").write_text(json.dumps(spec_to_hf_config(resolve("qwen2-vl-2b"))))
    setup, _ = setup_from_llamafactory({"model_name_or_path": str(tmp_path), "per_device_train_batch_size": 1})
    assert setup.model.text == resolve("qwen2-vl-2b").text


def test_lora_projector_needs_additional_target():
    base = {"model_name_or_path": "qwen2-vl-2b", "per_device_train_batch_size": 1, "bf16": True}
    setup, warns = setup_from_llamafactory({**base, "freeze_multi_modal_projector": False})
    assert setup.projector is Train.FROZEN and any("no effect with LoRA" in w for w in warns)
    setup, _ = setup_from_llamafactory({**base, "freeze_multi_modal_projector": False, "additional_target": "merger"})
    assert setup.projector is Train.FULL


@pytest.mark.parametrize("key, value, expected", [
    ("optim", "paged_adamw_32bit", "adamw"), ("optim", "lion_8bit", "adamw-8bit"),
    ("flash_attn", "fa3", "fa2"), ("quantization_method", "hqq", "qlora"),
])
def test_closest_choices_warn(key, value, expected):
    config = {"model_name_or_path": "qwen2-vl-2b", "per_device_train_batch_size": 1, "bf16": True, key: value}
    if key == "quantization_method":
        config["quantization_bit"] = 4
    setup, warns = setup_from_llamafactory(config)
    assert expected in (setup.optimizer, setup.attn, setup.method)
    assert warns


@pytest.mark.parametrize("config, message", [
    ({"finetuning_type": "oft", "quantization_bit": 4}, "quantized OFT"),
    ({"finetuning_type": "oft", "oft_rank": 8}, "either --oft-rank or --oft-block-size"),
    ({"finetuning_type": "oft", "oft_block_size": -1}, "oft_block_size must be at least 0"),
    ({"finetuning_type": "oft", "image_resolution": 512}, "oft came with LLaMA-Factory v0.9.4"),
    ({"finetuning_type": "qlora"}, "finetuning_type 'qlora' is not one of"),
    ({"quantization_bit": 4, "finetuning_type": "full"}, "quantization_bit needs finetuning_type lora"),
    ({"quantization_bit": 3}, "quantization_bit 3 is not modelled"),
    ({"quantization_bit": 4, "quantization_method": "gptq"}, "pre-quantized"),
    ({"lora_rank": 0}, "lora_rank must be at least 1"),
    ({"lora_rank": "eight"}, "lora_rank must be an integer"),
    ({"cutoff_len": -5}, "cutoff_len must be at least 1"),
    ({"image_max_pixels": "512*512"}, "image_max_pixels must be an integer"),
    ({"image_max_pixels": 100, "image_min_pixels": 1000}, "cannot be smaller than image_min_pixels"),
    ({"lora_dropout": 1.5}, r"lora_dropout must be in \[0.0, 1.0\)"),
    ({"bf16": "yes"}, "bf16 must be true or false"),
    ({"bf16": True, "fp16": True}, "both true"),
    ({"flash_attn": "fa4"}, "flash_attn 'fa4' is not one of"),
    ({"optim": "my_optimizer"}, "optim 'my_optimizer' is not an optimizer vlplan knows"),
    ({"train_mm_proj_only": True}, "only valid for full training"),
    ({"freeze_trainable_layers": 0, "finetuning_type": "freeze"}, "non-zero integer"),
    ({"deepspeed": "my_config.json"}, "does not say the ZeRO stage"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be at least 1"),
    ({"model_name_or_path": "no-such-model"}, "unknown model"),
    ({"stage": "grpo"}, "stage 'grpo' is not one of"),
])
def test_bad_values_are_one_line_errors(config, message):
    with pytest.raises(VlplanError, match=message):
        setup_from_llamafactory({"model_name_or_path": "qwen2-vl-2b", "per_device_train_batch_size": 1, **config})


def test_missing_model_malformed_and_missing_files(tmp_path):
    with pytest.raises(VlplanError, match="no model_name_or_path"):
        setup_from_llamafactory({"finetuning_type": "lora"})
    with pytest.raises(VlplanError, match="does not exist"):
        setup_from_llamafactory(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: qwen2-vl-2b\nlora_rank: [8\n")
    with pytest.raises(VlplanError, match=r"not valid YAML .*line \d+"):
        setup_from_llamafactory(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(VlplanError, match="YAML mapping"):
        setup_from_llamafactory(bad)
    bad.write_text("")
    with pytest.raises(VlplanError, match="is empty"):
        setup_from_llamafactory(bad)


def test_unknown_and_version_mismatched_keys_warn():
    _, warns = setup_from_llamafactory({"model_name_or_path": "qwen2-vl-2b", "per_device_train_batch_size": 1,
                                        "bf16": True, "lora_rankk": 8, "learning_rate": 1e-4, "template": "qwen2_vl"})
    assert len(warns) == 1 and "unknown key 'lora_rankk'" in warns[0]
    _, warns = setup_from_llamafactory({"model_name_or_path": "qwen2-vl-2b", "per_device_train_batch_size": 1,
                                        "bf16": True, "train_mm_proj_only": False, "freeze_language_model": False})
    assert any("freeze_language_model is not a key of LLaMA-Factory v0.9.1" in w for w in warns)


# Round trips ----------------------------------------------------------------------------------------------------------
def _export_import(setup, version, tmp_path, **overrides):
    ds_path = None
    if setup.zero > 0:
        ds_path = tmp_path / "ds.json"
        ds_path.write_text(json.dumps(deepspeed_config(setup)))
    exported = llamafactory_yaml(setup, version=version, deepspeed_path=str(ds_path) if ds_path else None)
    text = dump_yaml(exported, version)
    (tmp_path / "train.yaml").write_text(text)
    again, _ = setup_from_llamafactory(tmp_path / "train.yaml", version=version if version in ("0.9.0", "0.9.1")
                                       else None, images=list(setup.images), **overrides)
    return exported, again


@pytest.mark.parametrize("path", ALL_FIXTURES, ids=lambda p: str(p.relative_to(FIXTURES)))
def test_fixture_import_export_import(path, tmp_path):
    setup, _ = setup_from_llamafactory(path)
    version = detect_version(yaml.safe_load(path.read_text()))[0]
    _, again = _export_import(setup, version, tmp_path)
    assert again == setup


def _setups():
    qwen, llava = resolve("qwen2-vl-2b"), resolve("llava-1.5-7b")
    yield "lora", make_setup(qwen, method="lora", lora_rank=16, lora_target="q_proj,v_proj", batch_size=2)
    yield "lora-vision-projector", make_setup(qwen, method="lora", train_vision=True, train_projector=True, dora=True)
    yield "qlora8", make_setup(llava, method="qlora", quant_bits=8, optimizer="paged-adamw-8bit", attn="fa2")
    yield "full-zero3-offload", make_setup(qwen, method="full", zero=3, offload="all", num_gpus=8, precision="fp16")
    yield "full-projector-only", make_setup(llava, method="full", train_projector=True, freeze_llm=True, zero=2,
                                            offload="optimizer", ds_reduce_bucket_size=200_000_000,
                                            ds_overlap_comm=True)
    yield "freeze-packing-pure-bf16", make_setup(llava, method="freeze", freeze_trainable_layers=3, packing=True,
                                                 precision="pure-bf16", optimizer="adafactor", seq_len=4095,
                                                 gradient_checkpointing=False, liger_kernel=True, zero=1)
    yield "neat-packing", make_setup(qwen, method="lora", packing=True, neat_packing=True, seq_len=4096,
                                     video_fps=0.5, video_maxlen=64)
    yield "oft-rank", make_setup(qwen, method="oft", oft_rank=16, lora_target="q_proj,v_proj", module_dropout=0.1)
    yield "oft-vision-projector", make_setup(llava, method="oft", oft_block_size=16, train_vision=True,
                                             train_projector=True)
    yield "video-and-images", make_setup(qwen, method="lora", images=[(1280, 720), (300, 4000)], video_fps=1.0,
                                         video_maxlen=32, video_max_pixels=128 * 128, image_max_pixels=1003520,
                                         seq_len=8192, attn="eager", optimizer="sgd", max_grad_norm=0.3)


SETUPS = dict(_setups())


def _for_version(setup, version):
    """The setup as an old version can write it: no image floor before v0.9.2, side lengths in v0.9.0."""
    if version in ("0.9.0", "0.9.1"):
        setup = dataclasses.replace(setup, image_min_pixels=None)
    if version == "0.9.0":
        side = int(setup.image_max_pixels ** 0.5)
        setup = dataclasses.replace(setup, video_max_pixels=256 * 256, image_max_pixels=side * side)
    return setup


def _expressible(setup, version) -> bool:
    if setup.method == "oft" and version in ("0.9.0", "0.9.1", "0.9.2", "0.9.3"):
        return False  # finetuning_type oft came with v0.9.4
    old = version in ("0.9.0", "0.9.1")
    if old and (setup.language is Train.FROZEN and not (setup.method == "full" and setup.projector is Train.FULL)):
        return False
    if old and setup.projector is Train.FULL and setup.method in ("full", "freeze") and setup.language is Train.FULL:
        return False
    return True


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", SETUPS)
def test_setup_export_import_is_identity(name, version, tmp_path):
    setup = _for_version(SETUPS[name], version)
    if not _expressible(setup, version):
        with pytest.raises(VlplanError, match="cannot express"):
            llamafactory_yaml(setup, version=version)
        return
    exported, again = _export_import(setup, version, tmp_path, gpu=setup.gpu, num_gpus=setup.num_gpus)
    assert again == dataclasses.replace(setup, stack="llamafactory")  # a YAML is read as LLaMA-Factory's stack
    assert exported["per_device_train_batch_size"] == setup.batch_size


# Exported keys are keys LLaMA-Factory accepts -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def training_arguments_fields():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import Seq2SeqTrainingArguments
        from transformers.training_args import OptimizerNames
    fields = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments) if f.init}
    return fields, {o.value for o in OptimizerNames}


@pytest.mark.parametrize("version", VERSIONS)
def test_exported_keys_are_accepted(version, training_arguments_fields, tmp_path):
    hf_fields, optim_names = training_arguments_fields
    accepted = llamafactory_keys(version) | hf_fields
    checked = 0
    for setup in SETUPS.values():
        setup = _for_version(setup, version)
        if not _expressible(setup, version):
            continue
        exported = llamafactory_yaml(setup, version=version, extra={"dataset": "mllm_demo", "template": "qwen2_vl",
                                                                    "output_dir": "saves/x", "learning_rate": 1e-4})
        assert set(exported) <= accepted, set(exported) - accepted
        assert exported["optim"] in optim_names
        assert exported["flash_attn"] in FLASH_ATTN
        if "quantization_method" in exported:
            allowed = QUANTIZATION_METHODS_OLD if version in ("0.9.0", "0.9.1", "0.9.2") else QUANTIZATION_METHODS
            assert exported["quantization_method"] in allowed
        checked += 1
    assert checked >= 4


def test_key_set_has_every_memory_key_and_version_renames():
    latest, old = llamafactory_keys("latest"), llamafactory_keys("0.9.1")
    assert {"image_max_pixels", "freeze_multi_modal_projector", "oft_rank"} <= latest
    assert not {"image_resolution", "train_mm_proj_only"} & latest
    assert {"image_resolution", "train_mm_proj_only"} <= old and "image_max_pixels" not in old
    assert "oft_rank" not in llamafactory_keys("0.9.3")
    # HF TrainingArguments keys are not LLaMA-Factory's own
    assert "per_device_train_batch_size" not in latest


def test_fp32_and_uncapped_images_cannot_be_exported():
    qwen = resolve("qwen2-vl-2b")
    with pytest.raises(VlplanError, match="no fp32 training mode"):
        llamafactory_yaml(make_setup(qwen, precision="fp32"))
    with pytest.raises(VlplanError, match="no image_max_pixels cap"):
        llamafactory_yaml(make_setup(qwen, image_max_pixels=None, image_size=(448, 448)))
    with pytest.raises(VlplanError, match="version '0.8.0'"):
        llamafactory_yaml(make_setup(qwen), version="0.8.0")


# A training file that trains (plan --export-llamafactory) -------------------------------------------------------------
def _training_yaml(*args, **kwargs):
    from vlplan.planner.io.llamafactory import training_yaml

    return training_yaml(*args, **kwargs)


RUN_KEYS = ("dataset", "dataset_dir", "template", "output_dir", "learning_rate", "num_train_epochs",
            "lr_scheduler_type", "warmup_steps", "logging_steps", "save_steps", "report_to")


@pytest.mark.parametrize("name", SETUPS)
def test_a_file_without_input_has_every_run_key_and_reads_back_the_same(name, tmp_path):
    setup = SETUPS[name]
    exported = _training_yaml(setup, deepspeed_path=str(tmp_path / "ds.json") if setup.zero else None, epochs=2)
    if setup.zero:
        (tmp_path / "ds.json").write_text(json.dumps(deepspeed_config(setup)))
    text = exported.text()
    config = yaml.safe_load(text)
    assert config == exported.config  # comments and section lines are YAML comments
    assert set(RUN_KEYS) <= set(config) and config["num_train_epochs"] == 2.0
    assert config["learning_rate"] == (1e-5 if setup.method == "full" else 1e-4)
    assert config["template"] == {"qwen2_vl": "qwen2_vl", "llava": "llava"}[setup.model.family]
    assert exported.placeholders == ["dataset"] and "dataset: mllm_demo  # FILL IN" in text
    assert text.startswith("# Written by vlplan") and "### dataset" in text and "### train" in text
    # the memory keys are llamafactory_yaml's, so the file plans the same setup
    memory = llamafactory_yaml(setup, deepspeed_path=str(tmp_path / "ds.json") if setup.zero else None)
    assert {key: config[key] for key in memory} == memory
    (tmp_path / "train.yaml").write_text(text)
    again, _ = setup_from_llamafactory(tmp_path / "train.yaml", images=list(setup.images), gpu=setup.gpu,
                                       num_gpus=setup.num_gpus)
    assert again == dataclasses.replace(setup, stack="llamafactory")  # the file runs under LLaMA-Factory


def test_templates_come_from_llamafactory_or_are_marked_placeholders():
    from vlplan.planner.io.llamafactory import TEMPLATE_PLACEHOLDER, llamafactory_template

    assert llamafactory_template(resolve("qwen3-vl-8b")) == "qwen3_vl_nothink"
    assert llamafactory_template(resolve("llava-v1.6-mistral-7b")) == "llava_next_mistral"
    # another checkpoint of a one-template family (a local folder): the family's
    assert llamafactory_template(dataclasses.replace(resolve("qwen2.5-vl-7b"), hf_id="my-org/my-qwen")) == "qwen2_vl"
    # LLaMA-Factory registers none for Phi-3.5-vision: no guess, a value its template lookup refuses
    phi = make_setup(resolve("phi-3.5-vision"))
    assert llamafactory_template(phi.model) is None
    exported = _training_yaml(phi)
    assert exported.config["template"] == TEMPLATE_PLACEHOLDER and exported.placeholders == ["dataset", "template"]
    assert "template: FILL_IN_TEMPLATE  # FILL IN" in exported.text()


def test_a_local_model_is_named_by_its_folder(tmp_path):
    from vlplan.planner.io.llamafactory import model_location

    (tmp_path / "config.json").write_text("{}")
    spec = dataclasses.replace(resolve("qwen2-vl-2b"), source_url=str(tmp_path / "config.json"))
    assert model_location(spec) == str(tmp_path)
    assert model_location(resolve("qwen2-vl-2b")) == "Qwen/Qwen2-VL-2B-Instruct"  # source_url is a web page
    assert _training_yaml(make_setup(spec)).config["model_name_or_path"] == str(tmp_path)


def test_an_input_file_keeps_every_key_the_plan_does_not_decide():
    base = yaml.safe_load((FIXTURES / "train_qlora" / "qwen2vl_lora_sft_otfq.yaml").read_text())
    base.update(gradient_checkpointing=True, pure_bf16=False, warmup_ratio=0.03, eval_strategy="steps",
                eval_steps=50, val_size=0.1, my_unknown_key=1, stage="dpo", use_dora=False,  # DPO + DoRA dropout: refused
                additional_target="visual.merger,embed_tokens")
    setup, _ = setup_from_llamafactory(base)
    base["fsdp"] = "full_shard"  # a file that sharded with FSDP: the plan's DeepSpeed settings replace it
    planned = dataclasses.replace(setup, batch_size=1, gradient_accumulation_steps=8, gradient_checkpointing=False)
    exported = _training_yaml(planned, base=base)
    config = exported.config
    # the plan's numbers
    assert (config["per_device_train_batch_size"], config["gradient_accumulation_steps"]) == (1, 8)
    assert config["disable_gradient_checkpointing"] is True
    # everything else of the file, the stage included (planned as DPO, planner/memory/preference.py)
    for key in ("model_name_or_path", "dataset", "template", "output_dir", "learning_rate", "num_train_epochs",
                "eval_strategy", "eval_steps", "val_size", "my_unknown_key", "lora_dropout", "image_min_pixels"):
        assert config[key] == base[key], key
    assert config["stage"] == "dpo"
    assert config["additional_target"] == "embed_tokens,visual.merger"  # the projector stays, the rest is kept
    # what would contradict the plan goes, and the caller is told
    assert set(exported.removed) == {"fsdp", "gradient_checkpointing", "pure_bf16"}
    assert not set(exported.removed) & set(config)
    assert config["warmup_steps"] == 0.03 and "warmup_ratio" not in config
    # changed keys say what they were
    assert exported.comments["per_device_train_batch_size"] == "vlplan plan (was 2)"
    assert "learning_rate" not in exported.comments and exported.placeholders == []
    assert list(config)[:3] == list(base)[:3]  # the file's own order
    assert yaml.safe_load(exported.text()) == config


def test_an_input_file_for_an_old_version_is_written_in_the_current_keys():
    base = yaml.safe_load((FIXTURES / "v0_9_1" / "llava1_5_pretrain_mm_proj.yaml").read_text())
    setup, _ = setup_from_llamafactory(base, version="0.9.1")
    exported = _training_yaml(setup, base=base, deepspeed_path="/x/ds_z2_config.json")
    config = exported.config
    assert {"image_resolution", "video_resolution", "train_mm_proj_only"} <= set(exported.removed)
    assert config["image_max_pixels"] == 262144 and config["freeze_multi_modal_projector"] is False
    assert config["deepspeed"] == "/x/ds_z2_config.json"
    # for v0.9.1 itself the old names stay
    old = _training_yaml(setup, base=base, version="0.9.1", deepspeed_path="/x/ds_z2_config.json")
    assert old.config["train_mm_proj_only"] is True and "image_resolution" in old.config
    assert "warmup_steps" not in old.config


def test_dump_yaml_comments_and_sections():
    text = dump_yaml({"a_key": 1, "b_list": [1, 2], "c": "x: y"}, comments={"a_key": "one", "b_list": "two"},
                     sections={"a_key": "first", "b_list": "second", "c": "second"})
    assert "### first\na_key: 1  # one" in text and "### second\n# two\nb_list:\n- 1\n- 2" in text
    assert yaml.safe_load(text) == {"a_key": 1, "b_list": [1, 2], "c": "x: y"}
    with pytest.raises(VlplanError, match="not a LLaMA-Factory key"):
        dump_yaml({"Bad Key": 1})


def test_an_input_file_without_a_dataset_gets_the_marked_placeholder():
    base = {"model_name_or_path": "qwen2-vl-2b", "finetuning_type": "lora", "per_device_train_batch_size": 1,
            "bf16": True, "learning_rate": 2e-4}
    setup, _ = setup_from_llamafactory(base)
    exported = _training_yaml(setup, base=base)
    assert exported.config["dataset"] == "mllm_demo" and exported.placeholders == ["dataset"]
    assert exported.config["template"] == "qwen2_vl" and exported.config["output_dir"].startswith("saves/")
    assert exported.config["learning_rate"] == 2e-4 and "# FILL IN" in exported.text()
