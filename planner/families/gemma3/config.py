"""Gemma 3: the config.json reader and writer (`READERS` / `WRITERS`, by model_type).

The shared helpers and the reading/writing entry points are in planner/hf_config.py; each defaults dict here
names the transformers configuration file whose class defaults it repeats.
"""

from __future__ import annotations

from dataclasses import replace

from ...hf_config import (
    SIGLIP_VISION_DEFAULTS,
    _base_text,
    _dtype,
    _image_token,
    _layer_pattern,
    _layer_types,
    _siglip_vision,
    _siglip_vision_config,
    _sub_config,
    _text_spec,
    _top,
)
from ...spec import ModelSpec, ProcessorSpec, ProjectorSpec
from ..llava.config import LLAVA_STYLE

# Gemma3TextConfig (models/gemma3/configuration_gemma3.py): layer_types None -> every 6th layer full
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                            tie_word_embeddings=True, attention_bias=False, sliding_window=4096, layer_types=None)


def _write_gemma3(spec, v, p, t) -> dict:
    text = dict(_base_text(spec, "gemma3_text"), hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                sliding_window=t.sliding_window, layer_types=_layer_types(t.num_layers, t.sliding_window_pattern))
    return _top(spec, text_config=text, vision_config=_siglip_vision_config(v), image_token_index=spec.image_token_id,
                mm_tokens_per_image=spec.processor.tokens_per_view)


def _read_gemma3(cfg: dict, *, name: str, url: str) -> ModelSpec:
    from .specs import GEMMA3_PROCESSOR, SIGLIP_896

    _, t = _sub_config(cfg, "text_config", {"gemma3_text": GEMMA3_TEXT_DEFAULTS}, "gemma3_text", "language model")
    _, vc = _sub_config(cfg, "vision_config", {"siglip_vision_model": SIGLIP_VISION_DEFAULTS},
                        "siglip_vision_model", "vision tower")
    vision = _siglip_vision(vc, SIGLIP_896)
    pattern = _layer_pattern(t.get("layer_types"), t.get("sliding_window_pattern", 6))
    # Gemma3Config.tie_word_embeddings (default True) decides for Gemma3ForConditionalGeneration
    text = _text_spec(dict(t, tie_word_embeddings=cfg.get("tie_word_embeddings", True)), "gemma3",
                      mlp="gated_gelu_tanh", qk_norm=True, sliding_window=t["sliding_window"],
                      sliding_window_pattern=pattern)
    tokens = cfg.get("mm_tokens_per_image", 256)
    patches_per_side, tokens_per_side = vision.image_size // vision.patch_size, round(tokens**0.5)
    return ModelSpec(
        name=name, family="gemma3", hf_id=cfg.get("_name_or_path", name), source_url=url,
        hf_class="Gemma3ForConditionalGeneration", vision=vision,
        projector=ProjectorSpec(arch="gemma3", in_features=vision.hidden_size, out_features=text.hidden_size,
                                bias=False, norm="rmsnorm", pixel_shuffle=patches_per_side // tokens_per_side),
        text=text, processor=replace(GEMMA3_PROCESSOR, patch_size=vision.patch_size, image_size=vision.image_size,
                                     tokens_per_view=tokens),
        image_token_id=_image_token(cfg, 262144), dtype=_dtype(cfg, "bfloat16"),
    )


# Where each component lives in the transformers model (modules.py): the LLaVA layout
COMPONENT_PREFIXES = {"gemma3": LLAVA_STYLE}

def _gemma3_preprocessor(processor: ProcessorSpec, pre: dict, size: dict) -> ProcessorSpec:
    """Gemma3ImageProcessor: pan and scan
    (`size`: the size dict of the checkpoint's preprocessor_config.json)."""
    return replace(processor, do_pan_and_scan=bool(pre.get("do_pan_and_scan") or False))

READERS = {"gemma3": _read_gemma3}
WRITERS = {"gemma3": _write_gemma3}
# preprocessor_config.json readers, by ProcessorSpec.rule (hf_config.spec_from_hf_config)
PREPROCESSOR_READERS = {"gemma3": _gemma3_preprocessor}
