"""The estimator's activation model (planner/families/qwen3_vl/memory.py) against the tracer (a real transformers
Qwen3VLForConditionalGeneration / Qwen3VLMoeForConditionalGeneration training step under fake tensors with CUDA
emulation), per phase, on shrunken specs that keep every code path: the interpolated learned position embedding,
2D vision RoPE, DeepStack mergers added after the first language-model layers, q/k RMSNorm, interleaved MRoPE, and
the MoE router with grouped-matmul experts (bf16 under LoRA, fp32 when trained in full)."""

from dataclasses import replace

import pytest
from tiny import assert_phases_match
from vlplan.planner.families.qwen3_vl.memory import layer_counts, spec_with_layers
from vlplan.planner.families.qwen3_vl.specs import qwen3_merger, qwen3_vl_vision
from vlplan.planner.memory.step import simulate
from vlplan.planner.registry import resolve
from vlplan.planner.setup import make_setup


def tiny(name: str):
    """A registry spec with small widths (8 experts, top-2 for the MoE) and a 2048-token vocabulary, so the layers,
    not the logits, set the peaks."""
    spec = resolve(name)
    vision = replace(spec.vision, hidden_size=128, intermediate_size=256, num_heads=2)
    text = replace(spec.text, hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2, head_dim=64,
                   vocab_size=2048)
    if text.is_moe:
        text = replace(text, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128)
    return replace(spec, name=f"tiny-{name}", vision=qwen3_vl_vision(vision, text.hidden_size),
                   projector=qwen3_merger(vision, text.hidden_size), text=text, image_token_id=2000)


DENSE = dict(text=2, vision=2, deepstack=2)
MOE = dict(text=1, vision=1, deepstack=1)
CASES = [
    # (spec, make_setup kwargs, layer counts)
    ("qwen3-vl-4b", dict(seq_len=320, image_size=(256, 256)), DENSE),
    ("qwen3-vl-4b", dict(seq_len=320, images=[(256, 256), (320, 240)], batch_size=2,
                         gradient_checkpointing=False), DENSE),
    ("qwen3-vl-4b", dict(seq_len=320, image_size=(256, 256), method="full", train_vision=True,
                         train_projector=True), DENSE),
    ("qwen3-vl-8b", dict(seq_len=320, image_size=(320, 240), attn="eager", train_vision=True,
                         gradient_checkpointing=False), DENSE),
    ("qwen3-vl-30b-a3b", dict(seq_len=320, image_size=(256, 256), gradient_checkpointing=False), MOE),
    ("qwen3-vl-30b-a3b", dict(seq_len=320, image_size=(256, 256), method="full"), MOE),
    # Adafactor's factored states of the 3-D expert weights and the learned position embedding
    ("qwen3-vl-30b-a3b", dict(seq_len=320, image_size=(256, 256), method="full", train_vision=True,
                              train_projector=True, optimizer="adafactor", gradient_checkpointing=False), MOE),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs, counts", CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}" for c in CASES])
def test_simulation_matches_trace(name, kwargs, counts):
    pytest.importorskip("transformers")
    from vlplan.profiler.trace import run_trace

    setup = make_setup(tiny(name), **kwargs)
    simulated = simulate(setup, counts)
    traced = run_trace(setup, counts)
    assert_phases_match(simulated, traced)


def test_layer_types():
    """DeepStack pairs are a layer type of their own (a tapped vision block plus the language layer the feature is
    added after); the real counts give the registry spec back, smaller ones spread the taps like the 4B's 5, 11, 17."""
    spec = resolve("qwen3-vl-4b")
    counts = layer_counts(spec)
    assert counts == dict(text=33, vision=21, deepstack=3)
    assert spec_with_layers(spec, counts) is spec
    small = spec_with_layers(spec, dict(text=2, vision=7, deepstack=3))
    assert small.vision.deepstack_visual_indexes == (1, 3, 5)
    assert (small.vision.num_layers, small.text.num_layers) == (10, 5)
    assert layer_counts(resolve("qwen3-vl-30b-a3b")) == dict(text=45, vision=24, deepstack=3)


def test_lora_skips_the_moe_router_and_experts():
    """The router (a plain weight used with F.linear) and the fused 3D experts are not nn.Linear: LoRA "all" adapts
    only the attention projections of the MoE language model, and the experts stay frozen bf16."""
    setup = make_setup(tiny("qwen3-vl-30b-a3b"), method="lora")
    from vlplan.planner.families.qwen3_vl.memory import Qwen3VLModel
    from vlplan.planner.memory.sim import Engine

    model = Qwen3VLModel(Engine(), setup, MOE)
    adapted = {p.name.rsplit(".", 2)[-2] for p in model.e.params if p.name.endswith("lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}
    experts = [p for p in model.e.params if ".mlp." in p.name]
    assert experts and all(not p.trainable and p.dtype == "bf16" for p in experts)
