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


# FlashAttention-2 (profiler/flash_emulate.py stands in for the flash-attn package; transformers' own flash code runs):
# no mask, position ids restarting per sample, `flash_attn_varlen_func` over the samples in the language model (q and
# k made contiguous first) and over cu_seqlens in the vision tower
FA2_CASES = [
    ("qwen2-vl-2b", dict(method="lora")),
    ("qwen2.5-vl-3b", dict(method="full", train_vision=True, gradient_checkpointing=False)),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs", FA2_CASES, ids=[f"{c[0]}-fa2-{i}" for i, c in enumerate(FA2_CASES)])
def test_neat_packing_fa2_varlen_matches_trace(name, kwargs):
    pytest.importorskip("transformers")
    from vlplan.profiler.trace import run_trace

    setup = make_setup(tiny_spec(name), **{"seq_len": 512, "image_size": (112, 112), "packing": True,
                                           "neat_packing": True, "attn": "fa2", "gpu": "a100-80g", **kwargs})
    simulated, traced = simulate(setup), run_trace(setup)
    assert_phases_match(simulated, traced)
    assert traced.phase_peaks["forward"].by_category["inputs/batch"] < setup.seq_len**2 * 2  # no bf16 4D mask


def test_neat_packing_fa2_takes_one_row():
    from vlplan.planner.errors import VlplanError
    from vlplan.planner.registry import resolve

    with pytest.raises(VlplanError, match="batch size of 1"):
        make_setup(resolve("qwen2.5-vl-7b"), packing=True, neat_packing=True, attn="fa2", batch_size=2)


def test_fa2_varlen_terms():
    """The varlen kernel's backward workspace grows by 128 rows per sample (flash_api.cpp mha_varlen_bwd), and the
    language model's q/k `.contiguous()` copies are made in every layer."""
    from vlplan.planner.memory import packing
    from vlplan.planner.memory.sim import Engine

    e = Engine()
    heads, kv_heads, dim, tokens = 4, 2, 64, 1000
    q = e.new(tokens * heads * dim, "bf16", rg=True, name="q")
    k = e.new(tokens * kv_heads * dim, "bf16", rg=True, name="k")
    v = e.new(tokens * kv_heads * dim, "bf16", rg=True, name="v")
    out = packing.flash_varlen_attention(e, q, k, v, heads, kv_heads, tokens, 3, "attn", from_position_ids=True)
    node = out.node
    padded = tokens + 128 * 3
    assert node.workspace == heads * padded * 4 + padded * heads * 64 * 4 + 2 * tokens * heads * dim * 2
    assert [t.name for t in node.saved][:2] == ["attn.q_contiguous", "attn.k_contiguous"]
