"""`plan`: the micro-batch is the largest that fits, the global batch is kept, the budget is never exceeded."""

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlplan.planner.errors import VlplanError
from vlplan.planner.hardware import find_gpu
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
    # nor over the host RAM budget (the GPU type's stated assumption here)
    for candidate in [result.chosen, *result.alternatives]:
        assert candidate.estimate.cpu_ram_bytes <= result.host_ram_budget_bytes


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
    assert "would fit: QLoRA 4-bit (--method qlora)" in str(err.value)
    # a shorter sequence is offered exactly when it fits
    from vlplan.planner.plan import _fits

    shorter = replace(setup, seq_len=2048, batch_size=1, gradient_accumulation_steps=4, gradient_checkpointing=True)
    assert ("--seq-len 2048" in str(err.value)) == _fits(shorter, int(setup.gpu.memory_bytes * 0.9), 64 * 2**30)


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

    import math

    # any custom GPU: the estimate depends on the GPU only through its kind (cuBLAS workspaces), not its memory
    setup = make_setup(tiny_spec("qwen2-vl-2b"), seq_len=128, image_size=(224, 224), precision="fp32",
                       gpu=custom_gpu(1.0))

    def peak(micro, **changes):
        return min(estimate(replace(setup, batch_size=micro, gradient_accumulation_steps=4 // micro,
                                    gradient_checkpointing=gc, **changes)).peak_bytes for gc in (False, True))

    # a GPU (no margin) that holds micro-batch 2 without offload, not 4, and 4 with ZeRO-3 + full offload
    two, four, four_offloaded = peak(2), peak(4), peak(4, zero=3, offload="all")
    capacity_mib = math.ceil(max(two, four_offloaded) / 2**20)
    assert capacity_mib * 2**20 < four, "the premise: offloading holds a micro-batch that nothing else does"
    setup = replace(setup, gpu=custom_gpu(capacity_mib / 1024))
    result = plan(setup, global_batch_size=4, margin=0.0)
    assert result.setup.offload == "none" and result.setup.batch_size == 2
    assert all(c.setup.offload == "none" for c in result.alternatives)
    assert any(r.startswith("no CPU offload") for r in result.reasons)

    big = make_setup(resolve("qwen2.5-vl-7b"), method="full", gpu="a100-80g", num_gpus=1)
    only = plan(big, global_batch_size=8, host_ram_bytes=512 * 2**30, host_ram_source="test")
    assert only.setup.offload != "none" and not any(r.startswith("no CPU offload") for r in only.reasons)
    assert only.chosen.estimate.cpu_ram_bytes <= 512 * 2**30


# Host RAM is part of "fits" -------------------------------------------------------------------------------------------
GIB = 2**30


def test_offload_never_needs_more_host_ram_than_the_budget():
    """72B full fine-tuning on one 24 GB card fits the GPU only with ZeRO-3 and full offload, which needs ~1.8 TiB of
    host RAM: with the RTX 4090's assumed 64 GiB nothing fits and the message says host RAM was the limit and what
    would fit; with 2 TiB given, the offload plan is chosen and its host RAM is within the budget."""
    setup = make_setup(resolve("qwen2.5-vl-72b"), method="full", gpu="rtx4090-24g")
    with pytest.raises(NothingFits) as err:
        plan(setup, global_batch_size=8)
    message = str(err.value)
    assert "host RAM is the limit" in message and "64 GiB of host RAM per node" in message
    need = next(int(word) for word in message.split("would fit: --host-ram-gib ")[1].split()[:1])
    assert 1700 < need < 2000
    fits = plan(setup, global_batch_size=8, host_ram_bytes=need * GIB, host_ram_source="test")
    assert (fits.setup.zero, fits.setup.offload) == (3, "all")
    assert fits.chosen.estimate.cpu_ram_bytes <= need * GIB
    with pytest.raises(NothingFits, match="host RAM is the limit"):
        plan(setup, global_batch_size=8, host_ram_bytes=(need - 2) * GIB, host_ram_source="test")
    d = fits.to_dict()
    assert d["host_ram_bytes"] == fits.chosen.estimate.cpu_ram_bytes and d["host_ram_budget_bytes"] == need * GIB
    assert d["host_ram_source"] == "test" and d["host_ram_assumed"] is False
    assert all(a["host_ram_bytes"] <= need * GIB for a in d["alternatives"])
    with pytest.raises(VlplanError, match="--host-ram-gib must be positive"):
        plan(setup, global_batch_size=8, host_ram_bytes=0)


def test_every_catalog_gpu_has_a_stated_host_ram_assumption():
    from vlplan.planner.hardware import CATALOG, HOST_RAM_PER_GPU, assumed_host_ram, custom_gpu

    assert set(HOST_RAM_PER_GPU) == {gpu.name for gpu in CATALOG}
    for gpu in CATALOG:
        assumption = HOST_RAM_PER_GPU[gpu.name]
        assert assumption.gib_per_gpu > 0 and assumption.source
        total, reason = assumed_host_ram(gpu, 8)
        assert total == int(assumption.gib_per_gpu * 8 * GIB) and assumption.source in reason
    total, reason = assumed_host_ram(custom_gpu(80), 2)
    assert "taken as a100-80g" in reason and total == 2 * 144 * GIB
    setup = make_setup(resolve("qwen2-vl-2b"), method="lora", gpu="h100-80g", num_gpus=4)
    result = plan(setup, global_batch_size=8)
    assert result.host_ram_assumed and result.host_ram_budget_bytes == 4 * 256 * GIB
    assert "AWS p5.48xlarge" in result.host_ram_source


def test_the_global_batch_is_bounded():
    setup = make_setup(resolve("qwen2-vl-2b"), method="lora")
    result = plan(setup, global_batch_size=2**20)  # the largest accepted
    assert result.setup.batch_size * result.setup.gradient_accumulation_steps == 2**20
    with pytest.raises(VlplanError, match="above the 1048576 samples"):
        plan(setup, global_batch_size=10**9)


def test_divisors_take_square_root_time():
    """`plan -g 1000000000` gave no answer in 120 s: the divisors came from a loop over every integer up to n."""
    import time

    from vlplan.planner.plan import _divisors

    for n in (1, 2, 12, 36, 97, 1000, 2**20):
        assert _divisors(n) == [d for d in range(1, n + 1) if n % d == 0]
    start = time.perf_counter()
    assert _divisors(10**10)[-2:] == [5 * 10**9, 10**10] and len(_divisors(10**10)) == 121
    assert time.perf_counter() - start < 5  # 2 x 10**5 trial divisions, not 10**10


def _cli(*args):
    from typer.testing import CliRunner

    from vlplan.cli.main import app

    return CliRunner().invoke(app, list(args))


def _errors(result) -> list[str]:
    """stderr without the warning lines (other settings of the model may warn)."""
    return [line for line in result.stderr.splitlines() if line and not line.startswith("warning: ")]


def test_plan_cli_host_ram(monkeypatch):
    import json

    args = ["plan", "--model", "qwen2.5-vl-72b", "--method", "full", "--gpu", "rtx4090-24g", "-g", "8"]
    result = _cli(*args)
    assert result.exit_code == 1 and "host RAM is the limit" in result.stderr
    result = _cli(*args, "--host-ram-gib", "2048", "--explain")
    assert result.exit_code == 0, result.output
    assert "host RAM per node" in result.stdout and "of 2048.00 GiB (--host-ram-gib)" in result.stdout
    assert "{" not in result.stdout and "assumptions" in result.stdout and "model FLOPs utilization" in result.stdout
    data = json.loads(_cli(*args, "--host-ram-gib", "2048", "--json").stdout)
    assert data["host_ram_budget_bytes"] == 2048 * GIB and data["host_ram_bytes"] <= 2048 * GIB
    for bad in ("0", "-1", "nan", "inf", "1e300"):
        result = _cli(*args, "--host-ram-gib", bad)
        assert result.exit_code == 2 and _errors(result) == [_errors(result)[0]], (bad, result.output)
        assert _errors(result)[0].startswith("error: --host-ram-gib"), (bad, result.output)
    # planning for this machine (one node, its GPUs have the planned GPU's memory): its RAM is the budget
    import vlplan.planner.hardware as hardware

    monkeypatch.setattr(hardware, "_local_gpus_mib", lambda: [24564, 24564])  # two RTX 4090s here
    monkeypatch.setattr(hardware, "_this_machine_ram_bytes", lambda: 100 * GIB)
    small = ["plan", "--model", "qwen2-vl-2b", "--num-gpus", "2", "-g", "8", "--json"]
    data = json.loads(_cli(*small, "--gpu", "rtx4090-24g").stdout)
    assert data["host_ram_budget_bytes"] == 100 * GIB and data["host_ram_source"].startswith("this machine's RAM")
    assert data["host_ram_assumed"] is False
    # another GPU than this machine's, more GPUs than it has, or several nodes: the GPU type's assumption
    for other in (["--gpu", "h100-80g"], ["--gpu", "rtx4090-24g", "--num-gpus", "4"],
                  ["--gpu", "rtx4090-24g", "--num-nodes", "2"]):
        data = json.loads(_cli(*small, *other).stdout)
        assert data["host_ram_assumed"] is True, other
    # and the flag beats both
    data = json.loads(_cli(*small, "--gpu", "rtx4090-24g", "--host-ram-gib", "50").stdout)
    assert data["host_ram_budget_bytes"] == 50 * GIB and data["host_ram_source"] == "--host-ram-gib"


def test_plan_cli_bounds_the_global_batch():
    import time

    start = time.perf_counter()
    result = _cli("plan", "--model", "qwen2-vl-2b", "-g", "1000000000")
    assert time.perf_counter() - start < 10
    assert result.exit_code == 2
    assert _errors(result) == ["error: --global-batch-size 1000000000 is above the 1048576 samples per optimizer step "
                               "vlplan plans for"]


@pytest.mark.parametrize("flag,value", [("--mfu", "nan"), ("--mfu", "-1"), ("--mfu", "2"), ("--num-samples", "-5"),
                                        ("--epochs", "-1"), ("--epochs", "nan"), ("--margin", "nan"),
                                        ("--margin", "1")])
def test_plan_cli_refuses_impossible_numbers(flag, value):
    result = _cli("plan", "--model", "qwen2-vl-2b", "-g", "8", flag, value)
    assert result.exit_code == 2, result.output
    errors = _errors(result)
    assert len(errors) == 1 and errors[0].startswith(f"error: {flag} "), errors


def test_the_micro_batch_search_stops_at_the_setups_size_bounds():
    """A larger micro-batch the setup refuses (images per micro-batch above its bound) counts as not fitting: the
    search keeps the largest accepted one instead of giving up on the strategy."""
    from tiny import tiny_spec

    from vlplan.planner.hardware import custom_gpu
    from vlplan.planner.setup import MAX_IMAGES_PER_MICRO_BATCH

    setup = make_setup(tiny_spec("qwen2-vl-2b"), seq_len=128, image_size=(56, 56), num_images=16,
                       gpu=custom_gpu(4096))
    result = plan(setup, global_batch_size=4096, host_ram_bytes=2**40, host_ram_source="test")
    assert result.setup.batch_size == MAX_IMAGES_PER_MICRO_BATCH // 16
    assert any("largest vlplan takes here" in r for r in result.reasons)


def test_checkpointing_the_estimator_refuses_is_not_called_a_choice():
    """Llama 3.2 Vision LoRA on LLaMA-Factory's stack cannot checkpoint (the real step fails: planner/families/mllama
    /memory.py `check_setup`): the plan goes without it and says why, not that it merely fits without."""
    setup = make_setup(resolve("llama-3.2-11b-vision"), method="lora", stack="llamafactory", gpu=find_gpu("a100-80g"))
    result = plan(setup, global_batch_size=8)
    assert not result.setup.gradient_checkpointing
    reason = next(r for r in result.reasons if r.startswith("gradient checkpointing off"))
    assert "refused" in reason and "cross-attention" in reason and "fits without" not in reason
    plain = plan(replace(setup, stack="vlplan"), global_batch_size=8)
    assert not any("refused" in r for r in plain.reasons)


def test_nothing_fits_says_checkpointing_is_refused():
    """Where the family refuses checkpointing, what the error reports and suggests goes without it (and QLoRA, which
    LLaMA-Factory prepares without the input hook, with it), and no lever turns it back on."""
    from vlplan.planner.plan import memory_levers

    setup = make_setup(resolve("llama-3.2-11b-vision"), method="lora", stack="llamafactory", gpu=find_gpu("l4-24g"))
    with pytest.raises(NothingFits) as err:
        plan(setup, global_batch_size=4)
    message = str(err.value)
    assert "gradient checkpointing is refused here" in message
    assert "the smallest setting (micro-batch 1, ZeRO" in message  # not "micro-batch 1, checkpointing"
    assert "QLoRA 4-bit" in message
    assert memory_levers(setup) == []  # offloaded checkpointing needs the checkpointing the setup cannot have
