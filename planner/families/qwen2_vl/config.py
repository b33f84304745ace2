"""Qwen2-VL and Qwen2.5-VL: the config.json reader and writer (`READERS` / `WRITERS`, by model_type).

The shared helpers and the reading/writing entry points are in planner/hf_config.py; each defaults dict here
names the transformers configuration file whose class defaults it repeats.
"""

from __future__ import annotations

from dataclasses import replace

from ...hf_config import _base_text, _dtype, _top, _with_defaults
from ...modules import LANGUAGE, PROJECTOR, VISION
from ...spec import ModelSpec, ProcessorSpec, ProjectorSpec, TextSpec

# Qwen2VLTextConfig / Qwen2_5_VLTextConfig defaults (the 72B sizes)
QWEN2_VL_TEXT_DEFAULTS = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                              num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=32768,
                              tie_word_embeddings=False)


def _qwen_text_config(spec: ModelSpec, model_type: str) -> dict:
    return dict(_base_text(spec, model_type),
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                hidden_act="silu", rms_norm_eps=1e-6)


def _write_qwen2_vl(spec, v, p, t) -> dict:
    vision = {"model_type": f"{spec.family}_vision" if spec.family == "qwen2_vl" else "qwen2_5_vl_vision",
              "depth": v.num_layers, "num_heads": v.num_heads, "patch_size": v.patch_size,
              "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
              "in_channels": v.in_channels}
    if spec.family == "qwen2_vl":
        vision.update(embed_dim=v.hidden_size, hidden_size=p.out_features,
                      mlp_ratio=v.intermediate_size // v.hidden_size, hidden_act="quick_gelu")
    else:
        vision.update(hidden_size=v.hidden_size, out_hidden_size=p.out_features,
                      intermediate_size=v.intermediate_size, hidden_act="silu", window_size=v.window_size,
                      fullatt_block_indexes=list(v.fullatt_block_indexes), tokens_per_second=2)
    return _top(spec, text_config=_qwen_text_config(spec, f"{spec.family}_text"), vision_config=vision,
                image_token_id=spec.image_token_id, video_token_id=spec.image_token_id + 1,
                vision_start_token_id=spec.image_token_id - 3, vision_end_token_id=spec.image_token_id - 2)


def _text_of(cfg: dict, defaults: dict) -> dict:
    """The text sub-config (nested in `text_config` in new files, top-level in old Qwen2-VL files)."""
    text = cfg.get("text_config")
    if text is None:
        text = {k: v for k, v in cfg.items() if k not in ("vision_config", "model_type")}
    text = _with_defaults(text, defaults)
    # `tie_word_embeddings` lives at the top level in old Qwen2-VL/2.5-VL files and in text_config in newer ones
    text["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False) or text.get("tie_word_embeddings"))
    return text


def _read_qwen2_vl(cfg: dict, *, name: str, url: str) -> ModelSpec:
    from ..qwen2_5_vl.specs import QWEN2_5_VL_VISION
    from .specs import QWEN2_VL_PROCESSOR, QWEN2_VL_VISION

    family = cfg["model_type"]
    t = _text_of(cfg, QWEN2_VL_TEXT_DEFAULTS)
    vc = dict(cfg.get("vision_config") or {})
    if "in_chans" in vc:
        vc["in_channels"] = vc.pop("in_chans")
    if "spatial_patch_size" in vc:
        vc["patch_size"] = vc.pop("spatial_patch_size")
    if family == "qwen2_vl":
        base = QWEN2_VL_VISION
        embed = vc.get("embed_dim", 1280)
        vision = replace(base, num_layers=vc.get("depth", 32), hidden_size=embed,
                         intermediate_size=embed * vc.get("mlp_ratio", 4), num_heads=vc.get("num_heads", 16),
                         patch_size=vc.get("patch_size", 14), in_channels=vc.get("in_channels", 3),
                         spatial_merge_size=vc.get("spatial_merge_size", 2),
                         temporal_patch_size=vc.get("temporal_patch_size", 2))
        out = vc.get("hidden_size", t["hidden_size"])
        norm, hf_class = "layernorm", "Qwen2VLForConditionalGeneration"
    else:
        base = QWEN2_5_VL_VISION
        vision = replace(base, num_layers=vc.get("depth", 32), hidden_size=vc.get("hidden_size", 1280),
                         intermediate_size=vc.get("intermediate_size", 3420), num_heads=vc.get("num_heads", 16),
                         patch_size=vc.get("patch_size", 14), in_channels=vc.get("in_channels", 3),
                         spatial_merge_size=vc.get("spatial_merge_size", 2),
                         temporal_patch_size=vc.get("temporal_patch_size", 2),
                         window_size=vc.get("window_size", 112),
                         fullatt_block_indexes=tuple(vc.get("fullatt_block_indexes", (7, 15, 23, 31))))
        out = vc.get("out_hidden_size", t["hidden_size"])
        norm, hf_class = "rmsnorm", "Qwen2_5_VLForConditionalGeneration"
    merged = vision.hidden_size * vision.spatial_merge_size**2
    return ModelSpec(
        name=name, family=family, hf_id=cfg.get("_name_or_path", name), source_url=url, hf_class=hf_class,
        vision=vision,
        projector=ProjectorSpec(arch="qwen_merger", in_features=merged, hidden_features=merged, out_features=out,
                                norm=norm, pixel_shuffle=vision.spatial_merge_size),
        text=TextSpec(arch="qwen2", num_layers=t["num_hidden_layers"], hidden_size=t["hidden_size"],
                      intermediate_size=t["intermediate_size"], num_heads=t["num_attention_heads"],
                      num_kv_heads=t["num_key_value_heads"], head_dim=t["hidden_size"] // t["num_attention_heads"],
                      vocab_size=t["vocab_size"], tie_word_embeddings=t["tie_word_embeddings"],
                      max_position_embeddings=t["max_position_embeddings"], qkv_bias=True),
        processor=QWEN2_VL_PROCESSOR, image_token_id=cfg.get("image_token_id", 151655),
        dtype=_dtype(cfg, "bfloat16"),
    )


# Where each component lives in the transformers model (module-name prefixes, most specific first; modules.py)
QWEN_STYLE = (("model.visual.merger", PROJECTOR), ("model.visual", VISION), ("model.language_model", LANGUAGE),
              ("lm_head", LANGUAGE))
COMPONENT_PREFIXES = {"qwen2_vl": QWEN_STYLE, "qwen2_5_vl": QWEN_STYLE}

def _qwen_preprocessor(processor: ProcessorSpec, pre: dict, size: dict) -> ProcessorSpec:
    """Qwen2VLImageProcessor: min/max_pixels (or size.shortest_edge/longest_edge), patch and merge sizes
    (`size`: the size dict of the checkpoint's preprocessor_config.json)."""
    min_pixels = pre.get("min_pixels", size.get("shortest_edge", processor.min_pixels))
    max_pixels = pre.get("max_pixels", size.get("longest_edge", processor.max_pixels))
    return replace(processor, min_pixels=int(min_pixels), max_pixels=int(max_pixels),
                   patch_size=int(pre.get("patch_size", processor.patch_size)),
                   merge_size=int(pre.get("merge_size", processor.merge_size)))

READERS = {"qwen2_vl": _read_qwen2_vl, "qwen2_5_vl": _read_qwen2_vl}
WRITERS = {"qwen2_vl": _write_qwen2_vl, "qwen2_5_vl": _write_qwen2_vl}
# preprocessor_config.json readers, by ProcessorSpec.rule (hf_config.spec_from_hf_config)
PREPROCESSOR_READERS = {"qwen_smart_resize": _qwen_preprocessor}
