"""The simulator's layer extrapolation equals a full simulation, across families and settings."""

import pytest

from vlplan.planner.memory.step import simulate, simulate_extrapolated
from vlplan.planner.registry import resolve
from vlplan.planner.setup import make_setup

CASES = [
    ("qwen2.5-vl-7b", dict(method="lora")),
    ("qwen2.5-vl-7b", dict(method="full", train_vision=True, train_projector=True, gradient_checkpointing=False)),
    ("qwen2-vl-7b", dict(method="lora", train_vision=True, attn="eager", seq_len=1024, image_size=(448, 448))),
    ("qwen2-vl-2b", dict(method="freeze", num_images=4, image_size=(448, 448), seq_len=4096)),
    ("qwen2-vl-2b", dict(method="full", optimizer="adamw-foreach", gradient_accumulation_steps=2)),
    ("llava-1.5-7b", dict(method="lora", train_vision=True, gradient_checkpointing=False)),
    ("llava-1.5-7b", dict(method="qlora", batch_size=4)),
    ("llava-1.5-13b", dict(method="full", precision="pure-bf16", num_gpus=4, zero=2)),
    ("qwen2.5-vl-3b", dict(method="lora", dora=True, gradient_checkpointing=False, seq_len=1024)),
]


@pytest.mark.parametrize("model,kw", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_extrapolated_simulation_equals_full(model, kw):
    setup = make_setup(resolve(model), **kw)
    full, fast = simulate(setup), simulate_extrapolated(setup)
    # exact but for 512-byte rounding of tensors whose size is not affine in the layer count (the stacked
    # per-parameter gradient norms of clip_grad_norm_)
    assert fast.phase_peaks == pytest.approx(full.phase_peaks, rel=1e-6, abs=4096)
    peak = full.peak_phase
    assert fast.peak_phase == peak
    for key, value in full.phase_breakdown[peak].items():
        assert fast.phase_breakdown[peak].get(key, 0) == pytest.approx(value, rel=1e-6, abs=4096), key


def test_simulation_ignores_the_cluster():
    """The memo key leaves out the settings the simulated step never reads: simulating without the memo under
    other values of each of them gives the same result, so plans and tables can share one simulation."""
    from dataclasses import replace

    from vlplan.planner.hardware import find_gpu
    from vlplan.planner.memory import step

    base = make_setup(resolve("qwen2-vl-2b"), method="full", seq_len=1024, image_size=(448, 448), num_gpus=2,
                      zero=2)
    reference = simulate(base)
    # the GPU enters only through its SDPA kernels (planner/memory/sdpa.py): an H200 runs the H100's
    variants = dict(gpu=find_gpu("h200-141g"), num_gpus=8, num_nodes=2, offload="optimizer", zero=3,
                    ds_reduce_bucket_size=10**6, ds_overlap_comm=True, packing=True, expandable_segments=True,
                    pref_beta=0.5, kto_chosen_weight=2.0, kto_rejected_weight=0.5)  # scalars in the DPO / KTO
    # losses (on preference setups: tests/test_contract.py)
    # FSDP's sharding settings re-partition the single-GPU simulation analytically (fsdp.py, tests/test_fsdp.py)
    assert set(variants) - {"zero"} == set(step.SIMULATION_IGNORES) - {"sharding", "fsdp"}
    for name, value in variants.items():
        other = replace(base, **{name: value})
        assert step.simulation_key(other) == step.simulation_key(base), name
        assert simulate(other).phase_peaks == reference.phase_peaks, name
    assert step.simulation_key(replace(base, zero=0, num_gpus=2)) != step.simulation_key(base)
    assert step.simulation_key(replace(base, gpu=find_gpu("a100-40g"))) != step.simulation_key(base)  # FlashAttention-2
    assert simulate_extrapolated(base) is simulate_extrapolated(replace(base, num_gpus=4))


@pytest.mark.parametrize("model,kw", [
    ("qwen2.5-vl-7b", dict(method="lora", batch_size=4, images=[(448, 448), (1344, 1344), (200, 1000)])),
    ("qwen2.5-vl-7b", dict(method="full", batch_size=3, image_size=(1920, 1080))),
    ("qwen2-vl-2b", dict(method="lora", num_images=4, image_size=(448, 448), batch_size=2)),
    ("qwen3-vl-8b", dict(method="lora", batch_size=2, image_size=(1024, 768))),
])
def test_grouped_vision_attention_equals_one_call_per_segment(model, kw, monkeypatch):
    """A frozen vision tower's per-image/per-window attention calls, grouped by length, give the same peaks and
    breakdowns as simulating every call."""
    from vlplan.planner.memory import model as model_module

    setup = make_setup(resolve(model), **kw)
    grouped = simulate(setup)
    assert any(calls > 1 for _, calls in model_module._grouped_calls([4, 4, 9, 4], lambda n: 512 * n, lambda n: n))
    monkeypatch.setattr(model_module, "_grouped_calls", lambda lengths, *_: [(n, 1) for n in lengths])
    separate = simulate(setup)
    assert grouped.phase_peaks == separate.phase_peaks
    assert grouped.phase_breakdown == separate.phase_breakdown
