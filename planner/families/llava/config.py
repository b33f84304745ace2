"""LLaVA and LLaVA-NeXT: the config.json reader and writer (`READERS` / `WRITERS`, by model_type).

The shared helpers and the reading/writing entry points are in planner/hf_config.py; each defaults dict here
names the transformers configuration file whose class defaults it repeats.
"""

from __future__ import annotations

from dataclasses import replace

from ...hf_config import (
    _VISION_ACT,
    TEXT_DEFAULTS,
    _base_text,
    _dtype,
    _feature_layer,
    _image_token,
    _llama_family_text,
    _side,
    _sub_config,
    _top,
    _vision_feature_layer,
    _vision_mlp,
)
from ...modules import LANGUAGE, PROJECTOR, VISION
from ...spec import ModelSpec, ProcessorSpec, ProjectorSpec, VisionSpec

# CLIPVisionConfig (models/clip/configuration_clip.py)
CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=224, patch_size=32, hidden_act="quick_gelu", num_channels=3)


# What LlavaConfig / LlavaNextConfig build when `vision_config` is missing (their sub_configs_defaults init_kwargs)
LLAVA_VISION_FALLBACK = dict(CLIP_VISION_DEFAULTS, intermediate_size=4096, hidden_size=1024, patch_size=14,
                             image_size=336, num_hidden_layers=24, num_attention_heads=16)


# PixtralVisionConfig (models/pixtral/configuration_pixtral.py)
PIXTRAL_VISION_DEFAULTS = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               num_channels=3, image_size=1024, patch_size=16, hidden_act="gelu")


def _llama_text_config(spec: ModelSpec) -> dict:
    model_type = "mistral" if spec.text.arch == "mistral" else "llama"
    text = dict(_base_text(spec, model_type), hidden_act="silu", rms_norm_eps=1e-5)
    if model_type == "mistral":
        text["sliding_window"] = spec.text.sliding_window
    return text


def _clip_vision_config(v: VisionSpec) -> dict:
    return {"model_type": "clip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "hidden_act": _VISION_ACT.get(v.mlp, "quick_gelu"), "projection_dim": 768,
            "num_channels": v.in_channels}


def _write_llava(spec, v, p, t) -> dict:
    if v.arch == "pixtral":
        vision = {"model_type": "pixtral", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                  "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
                  "patch_size": v.patch_size, "head_dim": v.head_dim, "num_channels": v.in_channels,
                  "hidden_act": "silu" if v.mlp == "gated_silu" else "gelu"}
        strategy = "full"
    else:
        vision, strategy = _clip_vision_config(v), "default"
    fields = dict(text_config=_llama_text_config(spec), vision_config=vision, image_token_index=spec.image_token_id,
                  projector_hidden_act="gelu", vision_feature_layer=_vision_feature_layer(v, -2),
                  vision_feature_select_strategy=strategy, multimodal_projector_bias=p.bias)
    if spec.family == "llava_next":
        fields["image_grid_pinpoints"] = [list(pair) for pair in spec.processor.pinpoints]
    elif spec.processor.rule == "fixed":
        fields["image_seq_length"] = spec.processor.tokens_per_view
    return _top(spec, **fields)


def _read_llava(cfg: dict, *, name: str, url: str) -> ModelSpec:
    """`llava` and `llava_next`: a CLIP or Pixtral tower, the 2-layer projector, a Llama or Mistral LM."""
    from ..llava_next.specs import LLAVA_NEXT_PROCESSOR
    from .specs import CLIP_VIT_L_336, PIXTRAL_VISION

    family = cfg["model_type"]
    text_type, t = _sub_config(cfg, "text_config", TEXT_DEFAULTS, "llama", "language model")
    vision_types = {"clip_vision_model": CLIP_VISION_DEFAULTS}
    if family == "llava":
        vision_types["pixtral"] = PIXTRAL_VISION_DEFAULTS
    vision_type, vc = _sub_config(cfg, "vision_config", vision_types, "clip_vision_model", "vision tower",
                                  fallback=LLAVA_VISION_FALLBACK)
    feature_layer = _feature_layer(cfg, -2)
    strategy = cfg.get("vision_feature_select_strategy", "default")
    image_size, patch = _side(vc["image_size"]), _side(vc["patch_size"])
    base = PIXTRAL_VISION if vision_type == "pixtral" else CLIP_VIT_L_336
    vision = replace(base, num_layers=vc["num_hidden_layers"], hidden_size=vc["hidden_size"],
                     intermediate_size=vc["intermediate_size"], num_heads=vc["num_attention_heads"],
                     patch_size=patch, image_size=image_size, in_channels=vc["num_channels"],
                     mlp=_vision_mlp(vc["hidden_act"], gated=vision_type == "pixtral"),
                     feature_layers=(feature_layer,))
    # LlavaConfig forwards a text_config tie to the top level (configuration_llava.py __post_init__)
    tie = bool(cfg.get("tie_word_embeddings") or t["tie_word_embeddings"])
    # Mistral's sliding_window (every layer, when set) is not modelled: the Mistral-based checkpoints here set it null
    text = _llama_family_text(t, text_type, tie=tie)
    grid = (image_size // patch) ** 2
    tokens = grid if strategy == "default" else grid + 1
    if family == "llava_next":
        pinpoints = cfg.get("image_grid_pinpoints") or LLAVA_NEXT_PROCESSOR.pinpoints
        processor = replace(LLAVA_NEXT_PROCESSOR, patch_size=patch, image_size=image_size, tokens_per_view=tokens,
                            pinpoints=tuple(tuple(pair) for pair in pinpoints))
        hf_class = "LlavaNextForConditionalGeneration"
    elif vision_type == "pixtral":
        processor = ProcessorSpec(rule="pixtral", patch_size=patch, image_size=image_size, longest_edge=image_size)
        hf_class = "LlavaForConditionalGeneration"
    else:
        processor = ProcessorSpec(rule="fixed", patch_size=patch, image_size=image_size, tokens_per_view=tokens)
        hf_class = "LlavaForConditionalGeneration"
    return ModelSpec(
        name=name, family=family, hf_id=cfg.get("_name_or_path", name), source_url=url, hf_class=hf_class,
        vision=vision,
        projector=ProjectorSpec(arch="mlp2x_gelu", in_features=vision.hidden_size, hidden_features=t["hidden_size"],
                                out_features=t["hidden_size"], bias=cfg.get("multimodal_projector_bias", True)),
        text=text, processor=processor, image_token_id=_image_token(cfg, 32000),
        dtype=_dtype(cfg, "float16"),
    )


# Where each component lives in the transformers model (module-name prefixes, most specific first; modules.py)
LLAVA_STYLE = (("model.multi_modal_projector", PROJECTOR), ("model.vision_tower", VISION),
               ("model.language_model", LANGUAGE), ("lm_head", LANGUAGE))
COMPONENT_PREFIXES = {"llava": LLAVA_STYLE, "llava_next": (("model.image_newline", PROJECTOR), *LLAVA_STYLE)}

def _pixtral_preprocessor(processor: ProcessorSpec, pre: dict, size: dict) -> ProcessorSpec:
    """PixtralImageProcessor: longest_edge and patch size
    (`size`: the size dict of the checkpoint's preprocessor_config.json)."""
    patch = pre.get("patch_size", processor.patch_size)
    patch = patch.get("height", processor.patch_size) if isinstance(patch, dict) else patch
    return replace(processor, longest_edge=int(size.get("longest_edge", processor.longest_edge)),
                   patch_size=int(patch))

READERS = {"llava": _read_llava, "llava_next": _read_llava}
WRITERS = {"llava": _write_llava, "llava_next": _write_llava}
# preprocessor_config.json readers, by ProcessorSpec.rule (hf_config.spec_from_hf_config)
PREPROCESSOR_READERS = {"pixtral": _pixtral_preprocessor}
