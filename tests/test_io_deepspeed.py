"""DeepSpeed JSON import/export held to DeepSpeed's own config class (after the HF Trainer fills the "auto" values the
way it does at launch), and the TrainingArguments export held to transformers' TrainingArguments."""

import copy
import json
import warnings
from pathlib import Path

import pytest

from vlplan.planner.errors import VlplanError
from vlplan.planner.io.deepspeed import deepspeed_config, deepspeed_from_name, read_deepspeed
from vlplan.planner.io.hf_args import training_arguments
from vlplan.planner.registry import resolve
from vlplan.planner.setup import make_setup

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory" / "examples" / "deepspeed"


def test_reads_llamafactory_files():
    z3, warns = read_deepspeed(FIXTURES / "ds_z3_config.json")
    assert (z3.zero, z3.offload, z3.reduce_bucket_size, z3.overlap_comm) == (3, "none", None, False)
    assert (z3.micro_batch_size, z3.gradient_accumulation_steps, z3.bf16, z3.fp16) == (None, None, None, None)
    z2, _ = read_deepspeed(FIXTURES / "ds_z2_offload_config.json")
    assert (z2.zero, z2.offload, z2.reduce_bucket_size) == (2, "optimizer", 500_000_000)
    assert warns == []


def test_deepspeed_defaults_and_pinned_numbers():
    settings, _ = read_deepspeed({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                                  "gradient_clipping": 0.5, "bf16": {"enabled": True},
                                  "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"},
                                                        "offload_optimizer": {"device": "nvme"}}})
    # DeepSpeedZeroConfig: overlap_comm defaults to True for stage 3; reduce_bucket_size to 5e8
    assert (settings.zero, settings.offload, settings.overlap_comm, settings.reduce_bucket_size) == (3, "all", True,
                                                                                                    500_000_000)
    assert (settings.micro_batch_size, settings.gradient_accumulation_steps, settings.gradient_clipping,
            settings.bf16) == (4, 2, 0.5, True)
    assert read_deepspeed({})[0].zero == 0


@pytest.mark.parametrize("name, stage, offload", [
    ("examples/deepspeed/ds_z3_offload_config.json", 3, "all"), ("ds_z2_offload_config.json", 2, "optimizer"),
    ("ds_z0_config.json", 0, "none"), ("deepspeed_zero2", 2, "none"), ("configs/zero3.json", 3, "none"),
    ("ds_config_zero_stage_1.json", 1, "none"),
])
def test_infer_from_name(name, stage, offload):
    settings, warns = deepspeed_from_name(name)
    assert (settings.zero, settings.offload) == (stage, offload)
    assert "not found" in warns[0]


@pytest.mark.parametrize("config, message", [
    ({"zero_optimization": {"stage": 4}}, "stage must be 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": "auto"}}, "stage must be 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param needs ZeRO stage 3"),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, "needs ZeRO stage 1, 2 or 3"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}, "device must be none, cpu or nvme"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": -1}}, "reduce_bucket_size must be a positive"),
    ({"zero_optimization": {"stage": 2, "overlap_comm": "yes"}}, "overlap_comm must be true or false"),
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu must be a positive"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both enabled"),
])
def test_bad_configs(config, message):
    with pytest.raises(VlplanError, match=message):
        read_deepspeed(config)


def test_bad_files(tmp_path):
    with pytest.raises(VlplanError, match="does not exist"):
        read_deepspeed(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(VlplanError, match="is a JSON object"):
        read_deepspeed(bad)
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(VlplanError, match=r"not valid JSON .*line 1"):
        read_deepspeed(bad)
    with pytest.raises(VlplanError, match="does not say the ZeRO stage"):
        deepspeed_from_name("my_config.json")


SETUPS = [
    dict(method="full", zero=1), dict(method="full", zero=2), dict(method="full", zero=2, offload="optimizer"),
    dict(method="full", zero=3, ds_overlap_comm=True), dict(method="full", zero=3, offload="all", precision="fp16"),
    dict(method="lora", zero=2, ds_reduce_bucket_size=200_000_000, batch_size=4, gradient_accumulation_steps=8,
         max_grad_norm=0.3, num_gpus=8),
    dict(method="lora", zero=0),
]


@pytest.fixture(scope="module")
def hf():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from deepspeed.runtime.config import DeepSpeedConfig
        from transformers import TrainingArguments
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
    return TrainingArguments, HfTrainerDeepSpeedConfig, DeepSpeedConfig


def _training_args(hf, setup):
    TrainingArguments = hf[0]
    args = training_arguments(setup, extra={"use_cpu": True})  # bf16 on a CPU-only test machine
    args.pop("deepspeed", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gradient_checkpointing is a deprecated alias in transformers >= 5.x
        return TrainingArguments(**args)


@pytest.mark.parametrize("choices", SETUPS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_written_config_is_accepted_by_deepspeed(choices, hf):
    _, HfTrainerDeepSpeedConfig, DeepSpeedConfig = hf
    setup = make_setup(resolve("qwen2-vl-2b"), **choices)
    config = deepspeed_config(setup)
    assert json.loads(json.dumps(config)) == config  # plain JSON
    # the HF Trainer fills "auto" from the training arguments (raising on any mismatch) and the model's hidden size
    filled = HfTrainerDeepSpeedConfig(copy.deepcopy(config))
    args = _training_args(hf, setup)
    filled.trainer_config_process(args)

    class Model:
        class config:
            hidden_size = setup.model.text.hidden_size

    filled.trainer_config_finalize(args, Model(), 100)
    ds = DeepSpeedConfig(filled.config)
    assert ds.zero_optimization_stage == setup.zero
    assert ds.train_micro_batch_size_per_gpu == setup.batch_size
    assert ds.gradient_accumulation_steps == setup.gradient_accumulation_steps
    assert ds.bfloat16_config.enabled == (setup.precision == "bf16")
    assert ds.float16_config.enabled == (setup.precision == "fp16")
    if setup.zero:
        assert (ds.zero_config.offload_optimizer is not None) == (setup.offload != "none")
        assert (ds.zero_config.offload_param is not None) == (setup.offload == "all")
        assert ds.zero_config.overlap_comm == setup.ds_overlap_comm
        expected_bucket = setup.ds_reduce_bucket_size or setup.model.text.hidden_size ** 2
        assert ds.zero_config.reduce_bucket_size == expected_bucket
    # and reading it back gives the same setup fields
    back, _ = read_deepspeed(config)
    assert back.setup_fields() == {"zero": setup.zero, "offload": setup.offload,
                                   "ds_reduce_bucket_size": setup.ds_reduce_bucket_size,
                                   "ds_overlap_comm": setup.ds_overlap_comm}


def test_training_arguments_export(hf):
    setup = make_setup(resolve("qwen2-vl-2b"), method="qlora", optimizer="paged-adamw-8bit", batch_size=2,
                       gradient_accumulation_steps=4, liger_kernel=True, num_gpus=2)
    args = training_arguments(setup)
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"], args["optim"]) == \
        (2, 4, "paged_adamw_8bit")
    assert args["ddp_find_unused_parameters"] is False and args["use_liger_kernel"] is True
    built = _training_args(hf, setup)
    assert built.per_device_train_batch_size == 2 and built.optim == "paged_adamw_8bit"
    assert built.gradient_checkpointing is True and built.remove_unused_columns is False
    zero = make_setup(resolve("qwen2-vl-2b"), method="full", zero=3, offload="all")
    assert training_arguments(zero)["deepspeed"] == "ds_z3_offload_config.json"
    assert training_arguments(make_setup(resolve("qwen2-vl-2b"), precision="pure-bf16"))["bf16"] is False
    with pytest.raises(VlplanError, match="would override"):
        training_arguments(setup, extra={"optim": "sgd"})
