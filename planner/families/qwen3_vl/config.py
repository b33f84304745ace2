"""Qwen3-VL and Qwen3-VL-MoE: the config.json reader and writer (`READERS` / `WRITERS`, by model_type).

The shared helpers and the reading/writing entry points are in planner/hf_config.py; each defaults dict here
names the transformers configuration file whose class defaults it repeats.
"""

from __future__ import annotations

from dataclasses import replace

from ...errors import VlplanError
from ...hf_config import _base_text, _dtype, _side, _sub_config, _text_spec, _tie, _top
from ...spec import ModelSpec
from ..qwen2_vl.config import PREPROCESSOR_READERS as QWEN2_VL_PREPROCESSOR_READERS
from ..qwen2_vl.config import QWEN_STYLE

# Qwen3VLTextConfig (models/qwen3_vl/configuration_qwen3_vl.py); it has no tie_word_embeddings field
QWEN3_VL_TEXT_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                              max_position_embeddings=128000, attention_bias=False)


# Qwen3VLMoeTextConfig (models/qwen3_vl_moe/configuration_qwen3_vl_moe.py)
QWEN3_VL_MOE_TEXT_DEFAULTS = dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                                  num_attention_heads=16, num_key_value_heads=16, head_dim=None,
                                  max_position_embeddings=128000, tie_word_embeddings=True, attention_bias=False,
                                  num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                                  decoder_sparse_step=1, mlp_only_layers=None)


# Qwen3VLVisionConfig / Qwen3VLMoeVisionConfig (same defaults)
QWEN3_VL_VISION_DEFAULTS = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3,
                                patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584,
                                num_position_embeddings=2304, deepstack_visual_indexes=(8, 16, 24))


def _write_qwen3_vl(spec, v, p, t) -> dict:
    text = dict(_base_text(spec, f"{spec.family}_text"), hidden_act="silu", rms_norm_eps=1e-6, attention_bias=False,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True})
    if t.is_moe:
        text.update(num_experts=t.num_experts, num_experts_per_tok=t.num_experts_per_tok,
                    moe_intermediate_size=t.moe_intermediate_size, decoder_sparse_step=1, mlp_only_layers=[])
    vision = {"model_type": f"{spec.family}_vision", "depth": v.num_layers, "hidden_size": v.hidden_size,
              "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "in_channels": v.in_channels,
              "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
              "temporal_patch_size": v.temporal_patch_size, "out_hidden_size": p.out_features,
              "num_position_embeddings": v.num_position_embeddings,
              "deepstack_visual_indexes": list(v.deepstack_visual_indexes), "hidden_act": "gelu_pytorch_tanh"}
    return _top(spec, text_config=text, vision_config=vision, image_token_id=spec.image_token_id,
                video_token_id=spec.image_token_id + 1, vision_start_token_id=spec.image_token_id - 3,
                vision_end_token_id=spec.image_token_id - 2)


def _read_qwen3_vl(cfg: dict, *, name: str, url: str) -> ModelSpec:
    from .specs import QWEN3_VL_PROCESSOR, QWEN3_VL_VISION, qwen3_merger

    family = cfg["model_type"]
    moe = family == "qwen3_vl_moe"
    text_defaults = QWEN3_VL_MOE_TEXT_DEFAULTS if moe else QWEN3_VL_TEXT_DEFAULTS
    # Qwen3VLMoeTextConfig saves num_experts as num_local_experts (its attribute_map); hub files use num_experts
    _, t = _sub_config(cfg, "text_config", {f"{family}_text": text_defaults}, f"{family}_text", "language model",
                       aliases={"num_local_experts": "num_experts"})
    vision_types = {f"{family}_vision": QWEN3_VL_VISION_DEFAULTS, family: QWEN3_VL_VISION_DEFAULTS}
    _, vc = _sub_config(cfg, "vision_config", vision_types, f"{family}_vision", "vision tower",
                        aliases={"num_attention_heads": "num_heads", "num_hidden_layers": "depth"})
    if t.get("attention_bias"):
        raise VlplanError("a Qwen3-VL language model with attention_bias is not supported")
    extra = dict(qk_norm=True)
    if moe:
        if t.get("mlp_only_layers") or t.get("decoder_sparse_step", 1) != 1:
            raise VlplanError("Qwen3-VL-MoE with dense layers (mlp_only_layers / decoder_sparse_step) is not supported")
        extra.update(num_experts=t["num_experts"], num_experts_per_tok=t["num_experts_per_tok"],
                     moe_intermediate_size=t["moe_intermediate_size"])
    # Qwen3VLConfig.tie_word_embeddings (default False) decides; text_config carries none in 5.23
    text = _text_spec(dict(t, tie_word_embeddings=_tie(cfg, False)), "qwen3_moe" if moe else "qwen3", **extra)
    vision = replace(QWEN3_VL_VISION, num_layers=vc["depth"], hidden_size=vc["hidden_size"],
                     intermediate_size=vc["intermediate_size"], num_heads=vc["num_heads"],
                     in_channels=vc["in_channels"], patch_size=_side(vc["patch_size"]),
                     spatial_merge_size=vc["spatial_merge_size"], temporal_patch_size=_side(vc["temporal_patch_size"]),
                     num_position_embeddings=vc["num_position_embeddings"],
                     deepstack_visual_indexes=tuple(vc["deepstack_visual_indexes"]),
                     out_hidden_size=vc["out_hidden_size"])
    return ModelSpec(
        name=name, family=family, hf_id=cfg.get("_name_or_path", name), source_url=url,
        hf_class="Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration",
        vision=vision, projector=qwen3_merger(vision, vc["out_hidden_size"]), text=text,
        processor=replace(QWEN3_VL_PROCESSOR, patch_size=vision.patch_size, merge_size=vision.spatial_merge_size),
        image_token_id=cfg.get("image_token_id", 151655), dtype=_dtype(cfg, "bfloat16"),
    )


# Where each component lives (modules.py): the Qwen2-VL layout; model.visual.deepstack_merger_list.* falls under
# model.visual (VISION), see vision_inventory
COMPONENT_PREFIXES = {"qwen3_vl": QWEN_STYLE, "qwen3_vl_moe": QWEN_STYLE}

READERS = {"qwen3_vl": _read_qwen3_vl, "qwen3_vl_moe": _read_qwen3_vl}
WRITERS = {"qwen3_vl": _write_qwen3_vl, "qwen3_vl_moe": _write_qwen3_vl}
# preprocessor_config.json readers, by ProcessorSpec.rule: Qwen2-VL's (the same image processor class)
PREPROCESSOR_READERS = QWEN2_VL_PREPROCESSOR_READERS
