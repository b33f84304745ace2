"""The estimator's activation model (planner/families/llava/memory.py, llava_next.py) against the tracer (a real
transformers LlavaForConditionalGeneration / LlavaNextForConditionalGeneration training step under fake tensors with
CUDA emulation), per phase, on shrunken specs that keep every code path: CLIP with the CLS token and
vision_feature_layer -2 (the last layer and post_layernorm get no gradient), LLaVA-NeXT's anyres views and
pack_image_features (unpadding, image_newline), Pixtral's packed images with 2D RoPE and the block-diagonal mask
(a cuDNN attention bias under sdpa), and Llama / Mistral (GQA) language models."""

from dataclasses import replace

import pytest

from vlplan.planner.memory.step import simulate
from vlplan.planner.registry import resolve
from vlplan.planner.setup import make_setup

from tiny import assert_phases_match

COUNTS = dict(text=2, vision=2)


def tiny(name: str):
    """A registry spec with small widths and a 2048-token vocabulary, so the layers, not the logits, set the peaks.
    CLIP keeps 14-px patches on 112-px views (8x8 patches + CLS); LLaVA-NeXT's pinpoints shrink with the view."""
    spec = resolve(name)
    text = replace(spec.text, hidden_size=256, intermediate_size=512, num_heads=4, head_dim=64, vocab_size=2048,
                   num_kv_heads=2 if spec.text.num_kv_heads < spec.text.num_heads else 4)
    vision = replace(spec.vision, hidden_size=64, intermediate_size=128, num_heads=4)
    processor = spec.processor
    if spec.vision.arch == "clip":
        vision = replace(vision, image_size=112)
        scale = 112 / spec.processor.image_size
        processor = replace(processor, image_size=112, tokens_per_view=64,
                            pinpoints=tuple((int(h * scale), int(w * scale)) for h, w in processor.pinpoints))
    projector = replace(spec.projector, in_features=vision.hidden_size, hidden_features=text.hidden_size,
                        out_features=text.hidden_size)
    return replace(spec, name=f"tiny-{name}", text=text, vision=vision, projector=projector, processor=processor,
                   image_token_id=2000)


CASES = [
    # (spec, make_setup kwargs)
    ("llava-1.5-7b", dict(seq_len=256, images=[(500, 400), (300, 900)])),
    ("llava-1.5-7b", dict(seq_len=256, method="full", train_vision=True, train_projector=True,
                          gradient_checkpointing=False)),
    ("llava-1.5-7b", dict(seq_len=256, lora_dropout=0.05, gradient_checkpointing=False)),  # dropout mask + copy
    ("llava-llama-3-8b", dict(seq_len=256, attn="eager", train_vision="lora")),
    ("llava-v1.6-mistral-7b", dict(seq_len=512, image_size=(1024, 768))),
    ("llava-v1.6-mistral-7b", dict(seq_len=768, images=[(1024, 768), (448, 448)], attn="eager",
                                   gradient_checkpointing=False)),
    ("llava-v1.6-vicuna-7b", dict(seq_len=512, images=[(640, 160), (100, 900)], method="full", train_vision=True,
                                  train_projector=True)),
    ("llava-v1.6-vicuna-7b", dict(seq_len=384, image_size=(640, 160), batch_size=2, train_vision="lora",
                                  gradient_checkpointing=False)),
    ("pixtral-12b", dict(seq_len=256, images=[(160, 128), (96, 64)])),
    ("pixtral-12b", dict(seq_len=256, image_size=(128, 96), train_vision="lora", attn="eager",
                         gradient_checkpointing=False)),
    ("pixtral-12b", dict(seq_len=256, image_size=(128, 96), method="full", train_vision=True, train_projector=True)),
    # Adafactor: factored states of CLIP's convolution and position table; image_newline is stepped first
    ("llava-v1.6-mistral-7b", dict(seq_len=512, image_size=(1024, 768), method="full", train_vision=True,
                                   train_projector=True, optimizer="adafactor")),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs", CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}" for c in CASES])
def test_simulation_matches_trace(name, kwargs):
    pytest.importorskip("transformers")
    from vlplan.profiler.trace import run_trace

    setup = make_setup(tiny(name), **kwargs)
    simulated = simulate(setup, COUNTS)
    traced = run_trace(setup, COUNTS)
    assert_phases_match(simulated, traced)


def test_clip_layers_after_the_feature_layer_get_no_optimizer_state():
    """vision_feature_layer -2: the last CLIP layer and post_layernorm feed no loss, so full fine-tuning gives them
    no gradient and AdamW no state (step._trainable)."""
    from vlplan.planner.families.llava.memory import LlavaModel
    from vlplan.planner.memory.sim import Engine

    setup = make_setup(tiny("llava-1.5-7b"), seq_len=256, method="full", train_vision=True, train_projector=True)
    model = LlavaModel(Engine(), setup, COUNTS)
    unused = {p.name for p in model.unused_params}
    assert {p.name for p in model.vision_layers[1].params} <= unused
    assert not {p.name for p in model.vision_layers[0].params} & unused
    assert {"vision.post_layernorm.weight", "vision.post_layernorm.bias"} <= unused
