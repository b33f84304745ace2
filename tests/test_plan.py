"""`plan`: the micro-batch is the largest that fits, the global batch is kept, the budget is never exceeded."""

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlplan.planner.errors import VlplanError
from vlplan.planner.memory.estimate import estimate
from vlplan.planner.plan import NothingFits, plan
from vlplan.planner.registry import resolve
from vlplan.planner.setup import make_setup

MODELS = ["qwen2-vl-2b", "qwen2.5-vl-3b", "qwen2.5-vl-7b", "llava-1.5-7b"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=st.sampled_from(MODELS), method=st.sampled_from(["lora", "full", "qlora"]),
       gpu=st.sampled_from(["a100-40g", "h100-80g", "rtx4090-24g"]), num_gpus=st.sampled_from([1, 2, 4]),
       global_batch=st.integers(1, 32), seq_len=st.sampled_from([1024, 2048]), margin=st.sampled_from([0.0, 0.1]))
def test_plan_properties(model, method, gpu, num_gpus, global_batch, seq_len, margin):
    setup = make_setup(resolve(model), method=method, gpu=gpu, num_gpus=num_gpus, seq_len=seq_len)
    try:
        result = plan(setup, global_batch_size=global_batch, margin=margin)
    except NothingFits as err:
        assert "nothing fits" in str(err)
        return
    s = result.setup
    budget = s.gpu.memory_bytes * (1 - margin)
    # the global batch is kept exactly (rounded to a multiple of the ranks only when it must be)
    assert s.batch_size * s.gradient_accumulation_steps * s.world_size == result.global_batch_size
    if global_batch % s.world_size == 0:
        assert result.global_batch_size == global_batch
    # never over budget by its own estimate
    assert result.chosen.estimate.peak_bytes <= budget
    assert estimate(s).peak_bytes == result.chosen.estimate.peak_bytes
    # the micro-batch is the largest dividing the per-rank batch that fits with the other settings unchanged
    per_rank = result.global_batch_size // s.world_size
    for bigger in [d for d in range(s.batch_size + 1, per_rank + 1) if per_rank % d == 0]:
        try:
            peak = estimate(replace(s, batch_size=bigger, gradient_accumulation_steps=per_rank // bigger)).peak_bytes
        except VlplanError:
            continue
        assert peak > budget
    for candidate in result.alternatives:
        assert candidate.estimate.peak_bytes <= budget
        assert candidate.time.seconds >= result.step_time_s


def test_plan_json_fields_and_reasons():
    setup = make_setup(resolve("qwen2.5-vl-7b"), method="lora", num_gpus=4)
    d = plan(setup, global_batch_size=32, num_samples=10000).to_dict()
    for key in ("micro_batch_size", "gradient_accumulation_steps", "num_gpus", "num_nodes", "global_batch_size",
                "zero_stage", "offload", "gradient_checkpointing", "attn", "settings", "estimate", "step_time_s",
                "reasons", "alternatives", "epoch_time_s", "gpu_hours"):
        assert key in d
    assert d["micro_batch_size"] * d["gradient_accumulation_steps"] * 4 == 32
    assert any("largest that fits" in r or "whole per-rank batch" in r for r in d["reasons"])
    assert d["gpu_hours"] == pytest.approx(d["epoch_time_s"] * 4 / 3600)


def test_uneven_global_batch_is_rounded_with_a_reason():
    setup = make_setup(resolve("qwen2-vl-2b"), method="lora", num_gpus=4)
    result = plan(setup, global_batch_size=10)
    assert result.global_batch_size in (8, 12)
    assert "not a multiple" in result.reasons[0]


def test_nothing_fits_says_what_would():
    setup = make_setup(resolve("qwen2-vl-72b"), method="full", gpu="t4-16g", precision="fp16", seq_len=8192,
                       num_images=4)
    with pytest.raises(NothingFits, match="would fit|nothing tried fits"):
        plan(setup, global_batch_size=8)
    # pure bf16 rules out ZeRO-3, so only QLoRA or a shorter sequence help on one 24 GB card
    setup = make_setup(resolve("qwen2.5-vl-7b"), method="lora", precision="pure-bf16", gpu="rtx3090-24g",
                       seq_len=4096, num_images=2)
    with pytest.raises(NothingFits) as err:
        plan(setup, global_batch_size=4)
    assert "would fit: QLoRA 4-bit (--method qlora)" in str(err.value) and "--seq-len 2048" in str(err.value)


def test_plan_cli(tmp_path):
    import json

    from typer.testing import CliRunner

    from vlplan.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["plan", "--model", "qwen2.5-vl-7b", "--num-gpus", "2", "--global-batch-size", "16",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["global_batch_size"] == 16
    result = runner.invoke(app, ["plan", "--model", "qwen2-vl-72b", "--method", "full", "--gpu", "t4-16g",
                                 "--precision", "fp16", "--seq-len", "8192", "--images", "4",
                                 "--global-batch-size", "8"])
    assert result.exit_code == 1 and result.stderr.startswith("error: nothing fits")
    result = runner.invoke(app, ["plan", "--model", "qwen2-vl-2b", "--global-batch-size", "0"])
    assert result.exit_code == 2


def test_plan_for_a_gpu_given_by_memory_only_ranks_at_a_stated_tensor_rate():
    """--gpu-memory-gib has no throughput: the plan still ranks (finite times, strict JSON) and says what it assumed;
    the ranking equals the one on the reference GPU with the same memory."""
    import json
    import math

    from typer.testing import CliRunner

    from vlplan.cli.main import app
    from vlplan.planner.hardware import custom_gpu, find_gpu
    from vlplan.planner.throughput import REFERENCE_GPU

    args = ["plan", "--model", "qwen2.5-vl-7b", "--num-gpus", "2", "--global-batch-size", "16"]
    result = CliRunner().invoke(app, [*args, "--gpu-memory-gib", "80", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert math.isfinite(data["step_time_s"]) and all(math.isfinite(a["step_time_s"]) for a in data["alternatives"])
    assert data["assumptions"]["tensor_rate_of"] == REFERENCE_GPU
    assert any("throughput is unknown" in r and REFERENCE_GPU in r for r in data["reasons"])
    text = CliRunner().invoke(app, [*args, "--gpu-memory-gib", "80"])
    assert text.exit_code == 0 and "nan" not in text.stdout

    reference = find_gpu(REFERENCE_GPU)
    custom = replace(custom_gpu(reference.memory_mib / 1024), link_gbps=reference.link_gbps)
    setup = make_setup(resolve("qwen2.5-vl-7b"), method="lora", num_gpus=2, gpu=custom)
    on_custom = plan(setup, global_batch_size=16)
    on_reference = plan(replace(setup, gpu=reference), global_batch_size=16)
    assert on_custom.to_dict()["alternatives"] == on_reference.to_dict()["alternatives"]
    assert on_custom.step_time_s == on_reference.step_time_s


def test_offload_is_chosen_only_when_nothing_fits_without_it():
    """A tiny model on a small GPU: ZeRO-3 + full offload would hold a larger micro-batch (one fewer micro-step),
    but settings without offload fit, so the plan keeps the states on the GPU and says why; when only offloading fits,
    it offloads."""
    from tiny import tiny_spec

    from vlplan.planner.hardware import custom_gpu

    setup = make_setup(tiny_spec("qwen2-vl-2b"), seq_len=128, image_size=(224, 224), precision="fp32",
                       gpu=custom_gpu(0.6953125))
    result = plan(setup, global_batch_size=4)
    assert result.setup.offload == "none" and result.setup.batch_size == 2
    assert all(c.setup.offload == "none" for c in result.alternatives)
    assert any(r.startswith("no CPU offload") for r in result.reasons)

    big = make_setup(resolve("qwen2.5-vl-7b"), method="full", gpu="a100-80g", num_gpus=1)
    only = plan(big, global_batch_size=8)
    assert only.setup.offload != "none" and not any(r.startswith("no CPU offload") for r in only.reasons)
