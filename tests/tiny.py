"""Tiny versions of registry specs (same code paths, small widths) for real CPU runs and fast traces."""

from __future__ import annotations

from dataclasses import replace

from vlplan.planner.registry import resolve
from vlplan.planner.spec import ModelSpec


def tiny_spec(name: str, text_layers: int = 2, vision_layers: int = 2) -> ModelSpec:
    spec = resolve(name)
    text = replace(spec.text, num_layers=text_layers, hidden_size=256, intermediate_size=512, num_heads=2,
                   num_kv_heads=1, head_dim=128, vocab_size=1024)
    if spec.family in ("qwen2_vl", "qwen2_5_vl"):
        vision = replace(spec.vision, num_layers=vision_layers, hidden_size=64, intermediate_size=128, num_heads=4,
                         fullatt_block_indexes=(vision_layers - 1,) if spec.vision.fullatt_block_indexes else ())
        projector = replace(spec.projector, in_features=256, hidden_features=256, out_features=256)
        return replace(spec, name=f"tiny-{name}", text=text, vision=vision, projector=projector, image_token_id=900)
    if spec.family == "llava":
        vision = replace(spec.vision, num_layers=vision_layers, hidden_size=64, intermediate_size=128, num_heads=4,
                         image_size=112)
        projector = replace(spec.projector, in_features=64, hidden_features=256, out_features=256)
        processor = replace(spec.processor, image_size=112, tokens_per_view=64)
        return replace(spec, name=f"tiny-{name}", text=text, vision=vision, projector=projector, processor=processor,
                       image_token_id=900)
    raise ValueError(f"no tiny variant for {name}")


TOLERANCE = 0.005  # per phase, relative to the traced peak


def assert_phases_match(simulated, traced, tolerance: float = TOLERANCE) -> None:
    """The estimator's simulated peak of every phase within `tolerance` of the traced one. Both report the same
    phases (a phase that allocates nothing, e.g. a fused AdamW step without clipping, is in neither)."""
    assert set(simulated.phase_peaks) == set(traced.phase_peaks)
    for phase, got in simulated.phase_peaks.items():
        expected = traced.phase_peaks[phase].total_bytes
        assert abs(got - expected) <= tolerance * expected, (
            f"{phase}: simulated {got} B, traced {expected} B ({100 * (got - expected) / expected:+.3f}%)")
