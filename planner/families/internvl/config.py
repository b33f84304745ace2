"""InternVL (the transformers -hf layout): the config.json reader and writer (`READERS` / `WRITERS`, by model_type).

The shared helpers and the reading/writing entry points are in planner/hf_config.py; each defaults dict here
names the transformers configuration file whose class defaults it repeats.
"""

from __future__ import annotations

from dataclasses import replace

from ...errors import VlplanError
from ...hf_config import (
    QWEN2_DEFAULTS,
    _base_text,
    _dtype,
    _feature_layer,
    _side,
    _sub_config,
    _text_spec,
    _tie,
    _top,
    _vision_feature_layer,
    _vision_mlp,
)
from ...spec import ModelSpec, ProcessorSpec, ProjectorSpec
from ..llava.config import LLAVA_STYLE

# InternVLVisionConfig (models/internvl/configuration_internvl.py)
INTERNVL_VISION_DEFAULTS = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, attention_bias=False,
                                use_qk_norm=False, intermediate_size=4096, hidden_act="gelu", norm_type="layer_norm",
                                image_size=448, patch_size=14, num_channels=3, use_mask_token=False,
                                use_absolute_position_embeddings=True, use_mean_pooling=True)


def _write_internvl(spec, v, p, t) -> dict:
    vision = {"model_type": "internvl_vision", "hidden_size": v.hidden_size, "num_hidden_layers": v.num_layers,
              "num_attention_heads": v.num_heads, "intermediate_size": v.intermediate_size,
              "attention_bias": v.qkv_bias, "use_qk_norm": v.qk_norm,
              "norm_type": "rms_norm" if v.norm == "rmsnorm" else "layer_norm", "image_size": [v.image_size] * 2,
              "patch_size": [v.patch_size] * 2, "num_channels": v.in_channels, "use_mean_pooling": not v.post_layernorm,
              "layer_scale_init_value": 0.1, "hidden_act": "gelu"}
    text = dict(_base_text(spec, "qwen2"), hidden_act="silu", rms_norm_eps=1e-6)
    # tie_word_embeddings written explicitly: the InternVLConfig default (True) would tie (see specs.py)
    return _top(spec, text_config=text, vision_config=vision, image_token_id=spec.image_token_id,
                image_seq_length=spec.processor.tokens_per_view, downsample_ratio=1 / p.pixel_shuffle,
                projector_hidden_act="gelu", vision_feature_layer=_vision_feature_layer(v, -1),
                vision_feature_select_strategy="default")


def _read_internvl(cfg: dict, *, name: str, url: str) -> ModelSpec:
    from .specs import INTERN_VIT_300M, INTERNVL_PROCESSOR

    _, t = _sub_config(cfg, "text_config", {"qwen2": QWEN2_DEFAULTS}, "qwen2", "language model")
    _, vc = _sub_config(cfg, "vision_config", {"internvl_vision": INTERNVL_VISION_DEFAULTS}, "internvl_vision",
                        "vision tower")
    if vc.get("use_mask_token") or not vc.get("use_absolute_position_embeddings", True):
        raise VlplanError("InternViT with use_mask_token or without absolute position embeddings is not supported")
    downsample = cfg.get("downsample_ratio", 0.5)
    shuffle = round(1 / downsample)
    image_size, patch = _side(vc["image_size"]), _side(vc["patch_size"])
    vision = replace(INTERN_VIT_300M, num_layers=vc["num_hidden_layers"], hidden_size=vc["hidden_size"],
                     intermediate_size=vc["intermediate_size"], num_heads=vc["num_attention_heads"],
                     patch_size=patch, image_size=image_size, in_channels=vc["num_channels"],
                     norm="rmsnorm" if vc["norm_type"] == "rms_norm" else "layernorm",
                     qkv_bias=bool(vc["attention_bias"]), qk_norm=bool(vc["use_qk_norm"]),
                     post_layernorm=not vc["use_mean_pooling"], mlp=_vision_mlp(vc["hidden_act"]),
                     feature_layers=(_feature_layer(cfg, -1),))
    # TRAP (specs.py): transformers 5.23 defaults the top-level tie to True, but the InternVL3 checkpoints
    # are untied and their -hf configs carry no tie key; an explicit key is honoured, a missing one means untied.
    text = _text_spec(dict(t, tie_word_embeddings=_tie(cfg, False)), "qwen2", qkv_bias=True)
    tokens = (image_size // patch) ** 2 // shuffle**2
    return ModelSpec(
        name=name, family="internvl", hf_id=cfg.get("_name_or_path", name), source_url=url,
        hf_class="InternVLForConditionalGeneration", vision=vision,
        projector=ProjectorSpec(arch="internvl_mlp", in_features=vision.hidden_size * shuffle**2,
                                hidden_features=text.hidden_size, out_features=text.hidden_size, norm="layernorm",
                                pixel_shuffle=shuffle),
        text=text, processor=replace(INTERNVL_PROCESSOR, patch_size=patch, image_size=image_size,
                                     tokens_per_view=tokens, merge_size=shuffle),
        image_token_id=cfg.get("image_token_id", cfg.get("image_token_index", 151667)),
        dtype=_dtype(cfg, "bfloat16"),
    )


# Where each component lives in the transformers model (modules.py): the LLaVA layout
COMPONENT_PREFIXES = {"internvl": LLAVA_STYLE}

def _internvl_preprocessor(processor: ProcessorSpec, pre: dict, size: dict) -> ProcessorSpec:
    """GotOcr2ImageProcessor: tile side, tile count bounds, crop_to_patches
    (`size`: the size dict of the checkpoint's preprocessor_config.json)."""
    return replace(processor, image_size=int(size.get("height", processor.image_size)),
                   max_tiles=int(pre.get("max_patches", processor.max_tiles)),
                   min_tiles=int(pre.get("min_patches", processor.min_tiles)),
                   crop_to_patches=bool(pre.get("crop_to_patches", processor.crop_to_patches)))

READERS = {"internvl": _read_internvl}
WRITERS = {"internvl": _write_internvl}
# preprocessor_config.json readers, by ProcessorSpec.rule (hf_config.spec_from_hf_config)
PREPROCESSOR_READERS = {"internvl_tiles": _internvl_preprocessor}
