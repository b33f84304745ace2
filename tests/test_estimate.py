"""The estimate's structure and its ZeRO model states against DeepSpeed's own estimator functions."""

import pytest

from vlplan.planner.errors import VlplanError
from vlplan.planner.memory.estimate import _largest_module_params, estimate, param_summary
from vlplan.planner.memory.zero import deepspeed_model_states
from vlplan.planner.registry import resolve
from vlplan.planner.setup import make_setup

deepspeed = pytest.importorskip("deepspeed")


def full_all(model="qwen2.5-vl-7b", **kw):
    return make_setup(resolve(model), method="full", train_vision=True, train_projector=True, **kw)


@pytest.mark.parametrize("gpus,offload", [(1, "none"), (4, "none"), (8, "none"), (4, "optimizer"), (8, "optimizer")])
def test_zero2_model_states_equal_deepspeed(gpus, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    setup = full_all(num_gpus=gpus, zero=2, offload=offload)
    params, trainable = param_summary(setup)
    assert trainable["total"] == params["total"]
    ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(params["total"], num_gpus_per_node=gpus, num_nodes=1,
                                                           cpu_offload=offload != "none")
    ours = deepspeed_model_states(setup, params["total"], trainable["total"], _largest_module_params(setup))
    assert sum(ours.gpu.values()) == pytest.approx(ds_gpu, abs=gpus)  # integer division per term
    if offload != "none":
        assert sum(ours.cpu_per_node.values()) == pytest.approx(ds_cpu, rel=1e-12)


@pytest.mark.parametrize("gpus,offload", [(2, "none"), (8, "none"), (8, "optimizer"), (8, "all")])
def test_zero3_model_states_equal_deepspeed(gpus, offload):
    """DeepSpeed counts the largest module from the model itself: build it on the meta device."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
    from hf_oracle import hf_param_counts, meta_model

    setup = full_all(num_gpus=gpus, zero=3, offload=offload)
    params, trainable = param_summary(setup)
    # model_to_params de-duplicates by data_ptr, which is 0 for every meta tensor: take only its largest module
    _, largest = model_to_params(meta_model(setup.model))
    total = hf_param_counts(setup.model)["total"]
    assert (total, largest) == (params["total"], _largest_module_params(setup))
    ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=offload != "none",
        cpu_offload_params=offload == "all", zero_init=True)
    ours = deepspeed_model_states(setup, params["total"], trainable["total"], largest)
    assert sum(ours.gpu.values()) == pytest.approx(ds_gpu, abs=gpus)
    if offload != "none":
        assert sum(ours.cpu_per_node.values()) == pytest.approx(ds_cpu, rel=1e-12)


def test_lora_zero_counts_only_trainable_states():
    """DeepSpeed's estimators count frozen parameters as trainable (DeepSpeed #5304); vlplan does not."""
    lora = make_setup(resolve("qwen2.5-vl-7b"), method="lora", num_gpus=4, zero=2)
    params, trainable = param_summary(lora)
    states = deepspeed_model_states(lora, params["total"], trainable["total"], _largest_module_params(lora))
    assert states.gpu["optimizer/fp32_grads_master_adam"] == 16 * trainable["total"] // 4
    assert states.gpu["weights/half"] == 2 * params["total"]


@pytest.mark.parametrize("kw", [dict(method="lora"), dict(method="qlora"), dict(method="full"),
                                dict(method="full", num_gpus=2), dict(method="full", zero=3, num_gpus=8),
                                dict(method="lora", zero=2, num_gpus=4, offload="optimizer"),
                                dict(method="freeze"), dict(method="lora", train_vision=True, train_projector=True)])
def test_model_states_do_not_depend_on_the_data_and_the_step_does(kw):
    """Four times the tokens leave every model-state term (weights, adapters, optimizer states) byte for byte as
    they were and raise the peak; every term is positive. (The breakdown sums to the peak by construction, which
    `estimate` asserts itself.)"""
    short, long = (estimate(make_setup(resolve("qwen2-vl-7b"), seq_len=seq_len, **kw)) for seq_len in (1024, 4096))
    states = ("weights/", "adapters/", "optimizer/")
    assert {k: v for k, v in short.breakdown_bytes.items() if k.startswith(states)} == \
        {k: v for k, v in long.breakdown_bytes.items() if k.startswith(states)}
    assert any(k.startswith("weights/") for k in short.breakdown_bytes)
    assert long.peak_bytes > short.peak_bytes and long.allocated_peak_bytes > short.allocated_peak_bytes
    assert all(v > 0 for v in short.breakdown_bytes.values()) and all(v > 0 for v in long.breakdown_bytes.values())


def test_memory_orders_of_methods():
    spec = resolve("qwen2.5-vl-7b")
    peak = {m: estimate(make_setup(spec, method=m)).peak_bytes for m in ("qlora", "lora", "full")}
    assert peak["qlora"] < peak["lora"] < peak["full"]
    pure = estimate(make_setup(spec, method="full", precision="pure-bf16")).peak_bytes
    assert pure < peak["full"]
    no_gc = estimate(make_setup(spec, method="lora", gradient_checkpointing=False)).peak_bytes
    assert no_gc > peak["lora"]


def test_trainable_counts():
    setup = make_setup(resolve("qwen2.5-vl-7b"), method="lora")
    _, trainable = param_summary(setup)
    # rank 8 on q,k,v,o,gate,up,down of 28 layers: 8 * (in + out) summed
    t = setup.model.text
    per_layer = 8 * ((3584 + 3584) + 2 * (3584 + 512) + (3584 + 3584) + 2 * (3584 + 18944) + (18944 + 3584))
    assert trainable["language"] == per_layer * t.num_layers
    assert trainable["vision"] == trainable["projector"] == 0


@pytest.mark.parametrize("name, seq_len, size", [
    ("qwen2.5-vl-7b", 512, (1920, 1080)), ("qwen2-vl-2b", 700, (3000, 500)), ("internvl3-8b", 200, (1920, 1080)),
    ("gemma-3-4b", 200, (896, 896)), ("llava-v1.6-mistral-7b", 1500, (1344, 336)), ("idefics3-8b", 1024, (1920, 1080)),
    ("smolvlm", 512, (1920, 1080))])
def test_too_short_a_sequence_suggests_an_image_max_pixels_that_fits_or_says_none_does(name, seq_len, size):
    """The suggested --image-max-pixels makes the same setup valid, with at least half the tokens it allows; processors
    that resize every image to a fixed size or tile grid (InternVL without crop_to_patches, Gemma 3 without
    pan-and-scan, Idefics3, SmolVLM) get no suggestion, since none would help."""
    import re

    spec = resolve(name)
    with pytest.raises(VlplanError) as err:
        make_setup(spec, seq_len=seq_len, image_size=size)
    message = str(err.value)
    assert "\n" not in message and "raise --seq-len to at least" in message
    found = re.search(r"--image-max-pixels \(e\.g\. (\d+)\)", message)
    if spec.family in ("internvl", "gemma3", "idefics3", "smolvlm"):
        assert found is None and "does not reduce" in message
        return
    setup = make_setup(spec, seq_len=seq_len, image_size=size, image_max_pixels=int(found.group(1)))
    assert seq_len / 2 <= setup.vision_tokens_per_sample + setup.special_tokens_per_sample < seq_len


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("stage", [1, 2])
def test_qlora_zero12_keeps_the_quantized_weights_packed(bits, stage):
    """ZeRO-1/2 cast floating-point parameters only (DeepSpeedEngine._cast_module_mixed_precision), which leaves
    bitsandbytes' uint8/int8 weights packed: the
    per-GPU weights are those of the single-GPU model (built by the simulation, blocks.py `_quantized`) with every
    floating-point parameter and adapter in bf16, not the whole model in bf16 (which made QLoRA + ZeRO-2 of a 7B
    model cost as much as LoRA). The oracle is the simulation's own parameter list at zero=stage."""
    from vlplan.planner.memory.step import simulate_extrapolated

    qlora = make_setup(resolve("qwen2.5-vl-7b"), method="qlora", quant_bits=bits, num_gpus=4, zero=stage)
    model = simulate_extrapolated(qlora).phase_breakdown["forward"]
    simulated = sum(v for k, v in model.items() if k.startswith(("weights/", "adapters/")))
    ours = {k: v for k, v in estimate(qlora).breakdown_bytes.items() if k.startswith(("weights/", "adapters/"))}
    # the simulation also holds a few non-parameter buffers (rotary inv_freq) that ZeRO's count leaves out
    assert sum(ours.values()) == pytest.approx(simulated, rel=1e-3)
    lora = estimate(make_setup(resolve("qwen2.5-vl-7b"), method="lora", num_gpus=4, zero=stage))
    saved = lora.breakdown_bytes["weights/half"] - sum(ours.values())
    assert saved > (2.5 if bits == 4 else 1.5) * 2**30
