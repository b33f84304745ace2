"""The estimator's activation model (planner/families/mllama/memory.py, idefics3.py, paligemma.py) against the tracer
(the real transformers Mllama / Idefics3 / PaliGemma training step under fake tensors with CUDA emulation), per
phase, on shrunken specs that keep every code path: Mllama's four tile slots per image with the aspect-ratio mask,
gated global layers and cross-attention layers on the image features; Idefics3's tiles, constant pixel masks and
pixel shuffle (SmolVLM: a 3x3 shuffle); PaliGemma's SigLIP, Gemma 2 eager soft-capped attention with the image
prefix mask, and the tied, soft-capped logits."""

from dataclasses import replace

import pytest

from vlplan.planner.errors import VlplanError
from vlplan.planner.memory.step import simulate
from vlplan.planner.registry import resolve
from vlplan.planner.setup import make_setup

from tiny import assert_phases_match



def tiny(name: str):
    """A registry spec with small widths. Views shrink to 112 px (8 x 8 patches; SmolVLM 126 px, 9 x 9, for its
    3 x 3 shuffle; Mllama 56-px tiles: 16 patches + class token, padded to 24). Mllama keeps its vocabulary, which
    must hold the pad token id of MllamaTextConfig."""
    spec = resolve(name)
    text = replace(spec.text, hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2, head_dim=64,
                   vocab_size=spec.text.vocab_size if spec.family == "mllama" else 2048)
    vision = replace(spec.vision, hidden_size=64, intermediate_size=128, num_heads=4)
    processor, image_token_id = spec.processor, 2000
    if spec.family == "mllama":
        vision = replace(vision, image_size=56)
        processor = replace(processor, image_size=56)
        projector = replace(spec.projector, in_features=64 * 6, out_features=256)
        image_token_id = spec.image_token_id
    elif spec.family == "paligemma":
        vision = replace(vision, image_size=112)
        processor = replace(processor, image_size=112, tokens_per_view=64)
        projector = replace(spec.projector, in_features=64, out_features=256)
    else:  # idefics3 / smolvlm
        scale = spec.projector.pixel_shuffle
        size = 112 if scale == 2 else 126
        vision = replace(vision, image_size=size)
        processor = replace(processor, image_size=size, longest_edge=4 * size,
                            tokens_per_view=(size // 14) ** 2 // scale ** 2)
        projector = replace(spec.projector, in_features=64 * scale ** 2, out_features=256)
    return replace(spec, name=f"tiny-{name}", text=text, vision=vision, projector=projector, processor=processor,
                   image_token_id=image_token_id)


MLLAMA_COUNTS = dict(text=2, cross=1, vision=2, vision_global=1)
CASES = [
    # (spec, make_setup kwargs, layer counts)
    ("paligemma2-3b", dict(seq_len=160), None),
    ("paligemma2-3b", dict(seq_len=160, method="full", gradient_checkpointing=False), None),
    ("paligemma2-3b", dict(seq_len=160, attn="eager", train_vision=True, train_projector=True), None),
    ("paligemma2-3b", dict(seq_len=96, batch_size=2, precision="pure-bf16"), None),
    ("idefics3-8b", dict(seq_len=160, image_size=(448, 112))),
    ("idefics3-8b", dict(seq_len=160, image_size=(448, 112), method="full", train_vision=True,
                         train_projector=True)),
    ("smolvlm", dict(seq_len=128, image_size=(504, 126), batch_size=2, gradient_checkpointing=False)),
    ("llama-3.2-11b-vision", dict(seq_len=64, image_size=(112, 56)), MLLAMA_COUNTS),
    ("llama-3.2-11b-vision", dict(seq_len=64, images=[(112, 56), (40, 90)], gradient_checkpointing=False),
     MLLAMA_COUNTS),
    ("llama-3.2-11b-vision", dict(seq_len=64, method="full", attn="eager"), MLLAMA_COUNTS),
    ("llama-3.2-11b-vision", dict(seq_len=64, method="full", train_vision=True, train_projector=True,
                                  gradient_checkpointing=False), MLLAMA_COUNTS),
    # Adafactor: PaliGemma's embedding matrix factored; Mllama's tile tables, and lm_head stepped last
    ("paligemma2-3b", dict(seq_len=160, method="full", train_vision=True, train_projector=True,
                           optimizer="adafactor", gradient_checkpointing=False), None),
    ("llama-3.2-11b-vision", dict(seq_len=64, method="full", train_vision=True, train_projector=True,
                                  optimizer="adafactor", gradient_checkpointing=False), MLLAMA_COUNTS),
]
CASES = [case if len(case) == 3 else (*case, None) for case in CASES]


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs, counts", CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}" for c in CASES])
def test_simulation_matches_trace(name, kwargs, counts):
    pytest.importorskip("transformers")
    from vlplan.profiler.trace import run_trace

    counts = counts or dict(text=2, vision=2)
    setup = make_setup(tiny(name), **kwargs)
    simulated = simulate(setup, counts)
    traced = run_trace(setup, counts)
    assert_phases_match(simulated, traced)


def test_mllama_refuses_training_the_image_path_with_reentrant_checkpointing():
    """Every checkpointed cross-attention layer back-propagates into the same image features: PyTorch fails on the
    second one, so neither the estimator nor the tracer pretends it runs."""
    from vlplan.planner.families.mllama.batch import mllama_batch

    setup = make_setup(tiny("llama-3.2-11b-vision"), seq_len=64, train_vision=True)
    with pytest.raises(VlplanError, match="gradient checkpointing"):
        simulate(setup, MLLAMA_COUNTS)
    with pytest.raises(VlplanError, match="gradient checkpointing"):
        mllama_batch(setup, None)


@pytest.mark.slow
def test_mllama_lora_on_llamafactory_stack_fails_with_reentrant_checkpointing(monkeypatch):
    """LLaMA-Factory's LoRA preparation (`enable_input_require_grads`, which hooks the vision tower's patch embedding
    too) makes the image features require grad; under its reentrant checkpointing the real step (LLaMA-Factory's own
    preparation, transformers' Mllama) fails at the second cross-attention layer's backward. The estimator refuses
    the setup; without checkpointing, and on the stacks that do not hook the tower, it runs and matches the trace."""
    pytest.importorskip("transformers")
    pytest.importorskip("llamafactory")
    from vlplan.planner.families.mllama import memory as mllama_memory
    from vlplan.profiler.trace import run_trace

    counts = dict(MLLAMA_COUNTS, cross=2)
    setup = make_setup(tiny("llama-3.2-11b-vision"), seq_len=64, image_size=(112, 56), stack="llamafactory")
    with pytest.raises(VlplanError, match="fails at the first backward"):
        simulate(setup, counts)
    with monkeypatch.context() as patched:  # the real code, with the refusal out of its way
        patched.setattr(mllama_memory, "check_setup", lambda setup: None)
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            run_trace(setup, counts)
    for fine in (replace(setup, gradient_checkpointing=False), replace(setup, stack="vlplan")):
        assert_phases_match(simulate(fine, counts), run_trace(fine, counts))


def test_paligemma_text_attention_is_eager_under_sdpa():
    """Gemma 2 has no SDPA path: the default attention resolves to eager, with (batch, 1, seq, seq) masks."""
    pytest.importorskip("transformers")
    from vlplan.profiler.build import hf_config

    config = hf_config(tiny("paligemma2-3b"), "sdpa")
    assert config.text_config._attn_implementation == "eager"
    assert config.vision_config._attn_implementation == "sdpa"
    sdpa = simulate(make_setup(tiny("paligemma2-3b"), seq_len=160), dict(text=2, vision=2))
    eager = simulate(make_setup(tiny("paligemma2-3b"), seq_len=160, attn="eager"), dict(text=2, vision=2))
    assert sdpa.phase_peaks == eager.phase_peaks
