"""The estimator's activation model (planner/memory, families/internvl.py and families/gemma3.py) against the tracer
(a real transformers training step under fake tensors with CUDA emulation), per phase, on shrunken InternVL3 and
Gemma 3 specs that keep every code path: layer scale, pixel shuffle, tiles, SigLIP, the pooling projector, q/k-norm,
sliding-window and full layers with the image-bidirectional masks (cuDNN attention with an additive bias)."""

from dataclasses import replace

import pytest

from vlplan.planner.memory.step import simulate
from vlplan.planner.registry import resolve
from vlplan.planner.setup import make_setup

from tiny import assert_phases_match

pytest.importorskip("transformers")
from vlplan.profiler.trace import run_trace  # noqa: E402



def tiny_internvl(crop_to_patches: bool = False):
    """InternVL3-2B with small widths and 112 px tiles (8x8 patches + CLS, 16 tokens after the pixel shuffle)."""
    spec = resolve("internvl3-2b")
    vision = replace(spec.vision, hidden_size=64, intermediate_size=256, num_heads=4, image_size=112)
    text = replace(spec.text, hidden_size=256, intermediate_size=1024, num_heads=4, num_kv_heads=2, head_dim=64,
                   vocab_size=1024)
    projector = replace(spec.projector, in_features=256, hidden_features=256, out_features=256)
    processor = replace(spec.processor, image_size=112, tokens_per_view=16, crop_to_patches=crop_to_patches)
    return replace(spec, name="tiny-internvl", vision=vision, text=text, projector=projector, processor=processor,
                   image_token_id=900)


def tiny_gemma3(pan_and_scan: bool = False):
    """Gemma-3-4B with small widths, 112 px views (8x8 patches pooled to 16 tokens) and a 48-token sliding window
    with every second layer global, so two layers hold both layer types and a 96-token sequence exceeds the window."""
    spec = resolve("gemma-3-4b")
    vision = replace(spec.vision, hidden_size=64, intermediate_size=256, num_heads=4, image_size=112)
    text = replace(spec.text, hidden_size=256, intermediate_size=1024, num_heads=4, num_kv_heads=2, head_dim=64,
                   vocab_size=1024, sliding_window=48, sliding_window_pattern=2)
    projector = replace(spec.projector, in_features=64, out_features=256)
    processor = replace(spec.processor, image_size=112, tokens_per_view=16, do_pan_and_scan=pan_and_scan)
    return replace(spec, name="tiny-gemma3", vision=vision, text=text, projector=projector, processor=processor,
                   image_token_id=900)


CASES = [
    # (spec, make_setup kwargs, layer counts)
    (tiny_internvl(), dict(seq_len=96), dict(text=2, vision=2)),
    (tiny_internvl(), dict(seq_len=96, num_images=2, gradient_checkpointing=False, attn="eager"),
     dict(text=2, vision=2)),
    (tiny_internvl(crop_to_patches=True), dict(seq_len=96, images=[(224, 112)], method="full", train_vision=True,
                                               train_projector=True), dict(text=2, vision=1)),
    (tiny_gemma3(), dict(seq_len=96), dict(text=2, vision=2)),
    (tiny_gemma3(), dict(seq_len=96, num_images=2, gradient_checkpointing=False), dict(text=2, vision=1)),
    (tiny_gemma3(), dict(seq_len=96, train_vision=True, attn="eager"), dict(text=2, vision=1)),
    (tiny_gemma3(pan_and_scan=True), dict(seq_len=96, images=[(600, 300)], method="full", train_vision=True,
                                          train_projector=True), dict(text=2, vision=1)),
    # Adafactor: InternVL's 3-D class token and position table, Gemma 3's plain projection matrix
    (tiny_internvl(), dict(seq_len=96, method="full", train_vision=True, train_projector=True, optimizer="adafactor",
                           gradient_checkpointing=False), dict(text=2, vision=2)),
    (tiny_gemma3(), dict(seq_len=96, method="full", train_vision=True, train_projector=True, optimizer="adafactor",
                         gradient_checkpointing=False), dict(text=2, vision=1)),
]


@pytest.mark.slow
@pytest.mark.parametrize("spec, kwargs, counts", CASES,
                         ids=[f"{c[0].name}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}" for c in CASES])
def test_simulation_matches_trace(spec, kwargs, counts):
    setup = make_setup(spec, **kwargs)
    simulated = simulate(setup, counts)
    traced = run_trace(setup, counts)
    assert_phases_match(simulated, traced)


def test_masks_follow_the_sequence_length():
    """Gemma 3's two (batch, 1, seq, seq) masks and each layer's cuDNN bias grow with seq^2 in the forward."""
    spec = tiny_gemma3()
    peaks = [simulate(make_setup(spec, seq_len=seq, gradient_checkpointing=False), dict(text=2, vision=1))
             .phase_peaks["forward"] for seq in (64, 128)]
    # at least the two bool masks and two layers' bf16 biases: 2 * s^2 + 2 * 2 * s^2 bytes more
    assert peaks[1] - peaks[0] >= 6 * (128 ** 2 - 64 ** 2)
