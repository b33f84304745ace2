"""Neat packing's block-diagonal mask (planner/memory/packing.py) against the tracer on the real transformers code,
per phase: the (batch, 1, seq, seq) compute-dtype mask as an input, repeat_kv and the masked CUDA sdpa kernel in
every language-model layer, on Qwen2-VL and Qwen2.5-VL."""

import pytest
from tiny import assert_phases_match, tiny_spec
from vlplan.planner.memory.step import simulate
from vlplan.planner.setup import make_setup
from vlplan.planner.video import Video

CASES = [
    ("qwen2-vl-2b", dict(method="lora")),
    ("qwen2-vl-2b", dict(method="full", batch_size=2, gradient_accumulation_steps=2)),
    ("qwen2.5-vl-3b", dict(method="full", gradient_checkpointing=False)),
    ("qwen2.5-vl-3b", dict(method="lora", train_vision=True, videos=(Video(160, 120, frames=6),),
                           video_max_pixels=112 * 112)),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_neat_packing_matches_trace(name, kwargs):
    pytest.importorskip("transformers")
    from vlplan.profiler.trace import run_trace

    setup = make_setup(tiny_spec(name), **{"seq_len": 512, "image_size": (112, 112), "packing": True,
                                           "neat_packing": True, **kwargs})
    simulated, traced = simulate(setup), run_trace(setup)
    assert_phases_match(simulated, traced)
    mask_bytes = setup.batch_size * setup.seq_len**2 * 2
    assert traced.phase_peaks["forward"].by_category["inputs/batch"] >= mask_bytes


def test_the_mask_costs_what_it_weighs():
    from vlplan.planner.memory.estimate import estimate
    from vlplan.planner.registry import resolve

    spec = resolve("qwen2.5-vl-7b")
    packed = estimate(make_setup(spec, seq_len=16384, packing=True))
    neat = estimate(make_setup(spec, seq_len=16384, packing=True, neat_packing=True))
    varlen = estimate(make_setup(spec, seq_len=16384, packing=True, neat_packing=True, attn="fa2"))
    mask = 16384**2 * 2  # 512 MiB of bf16
    assert neat.breakdown_bytes["inputs/batch"] - packed.breakdown_bytes["inputs/batch"] == mask
    assert neat.peak_bytes >= packed.peak_bytes + mask  # at least the mask (a 7B peak is in the loss phase)
    assert varlen.breakdown_bytes["inputs/batch"] < mask
