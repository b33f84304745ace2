"""PaliGemma 2: the config.json reader and writer (`READERS` / `WRITERS`, by model_type).

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
from ...spec import ModelSpec, ProjectorSpec
from ..llava.config import LLAVA_STYLE

# Gemma2Config (models/gemma2/configuration_gemma2.py): layer_types None -> alternate sliding / full
GEMMA2_DEFAULTS = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                       tie_word_embeddings=True, attention_bias=False, sliding_window=4096, layer_types=None)


# What PaliGemmaConfig builds when `vision_config` is missing (configuration_paligemma.py init_kwargs)
PALIGEMMA_VISION_FALLBACK = dict(SIGLIP_VISION_DEFAULTS, intermediate_size=4096, hidden_size=1152, patch_size=14,
                                 image_size=224, num_hidden_layers=27, num_attention_heads=16, vision_use_head=False)


def _write_paligemma(spec, v, p, t) -> dict:
    text = dict(_base_text(spec, "gemma2"), hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                sliding_window=t.sliding_window, layer_types=_layer_types(t.num_layers, t.sliding_window_pattern))
    vision = dict(_siglip_vision_config(v), projection_dim=p.out_features)
    return _top(spec, text_config=text, vision_config=vision, image_token_index=spec.image_token_id,
                projection_dim=p.out_features, hidden_size=p.out_features)


def _read_paligemma(cfg: dict, *, name: str, url: str) -> ModelSpec:
    from .specs import PALIGEMMA_448_PROCESSOR, SIGLIP_448

    # PaliGemmaConfig builds a `gemma` text model when text_config is missing (PaliGemma 1); only Gemma 2 is modelled
    _, t = _sub_config(cfg, "text_config", {"gemma2": GEMMA2_DEFAULTS}, "gemma", "language model")
    _, vc = _sub_config(cfg, "vision_config", {"siglip_vision_model": SIGLIP_VISION_DEFAULTS},
                        "siglip_vision_model", "vision tower", fallback=PALIGEMMA_VISION_FALLBACK)
    vision = _siglip_vision(vc, SIGLIP_448)
    pattern = _layer_pattern(t.get("layer_types"), 2)
    text = _text_spec(dict(t, tie_word_embeddings=cfg.get("tie_word_embeddings", True)), "gemma2",
                      mlp="gated_gelu_tanh", sliding_window=t["sliding_window"], sliding_window_pattern=pattern)
    grid = (vision.image_size // vision.patch_size) ** 2
    return ModelSpec(
        name=name, family="paligemma", hf_id=cfg.get("_name_or_path", name), source_url=url,
        hf_class="PaliGemmaForConditionalGeneration", vision=vision,
        # PaliGemmaConfig.projection_dim (default 2048) overrides vision_config.projection_dim
        projector=ProjectorSpec(arch="linear", in_features=vision.hidden_size,
                                out_features=cfg.get("projection_dim", 2048)),
        text=text, processor=replace(PALIGEMMA_448_PROCESSOR, patch_size=vision.patch_size,
                                     image_size=vision.image_size, tokens_per_view=grid),
        image_token_id=_image_token(cfg, 256000), dtype=_dtype(cfg, "bfloat16"),
    )


# Where each component lives in the transformers model (modules.py): the LLaVA layout
COMPONENT_PREFIXES = {"paligemma": LLAVA_STYLE}

READERS = {"paligemma": _read_paligemma}
WRITERS = {"paligemma": _write_paligemma}
