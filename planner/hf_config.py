"""Conversion between `ModelSpec` and transformers `config.json` dicts, without importing transformers.

`spec_to_hf_config(spec)` writes the config a transformers class builds the model from (used by the tracer and the
tests); for the remote-code families (MiniCPM-V, Phi-3.5-vision) it writes their hub config.json layout.
`spec_from_hf_config(path)` reads a local `config.json` (or a model directory holding one, plus its
`preprocessor_config.json`). Saved configs drop values equal to the class defaults (transformers
`PretrainedConfig.to_diff_dict`; hub files saved by transformers 4.x drop them inside text_config/vision_config too),
so each reader fills in the defaults of the transformers config classes it mirrors (the dicts below, each naming
its configuration file in transformers 5.23); `tests/test_hf_config.py` checks them against transformers' own
diff-saved configs and against configs stripped of every class default.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from .errors import VlplanError
from .spec import ModelSpec, ProcessorSpec, ProjectorSpec, TextSpec, VisionSpec

# Language-model config defaults ------------------------------------------------------------------------------------
# LlamaConfig (models/llama/configuration_llama.py)
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=2048,
                      tie_word_embeddings=False, head_dim=None, attention_bias=False, mlp_bias=False)
# MistralConfig (models/mistral/configuration_mistral.py)
MISTRAL_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                        tie_word_embeddings=False, head_dim=None)
# Qwen2Config (models/qwen2/configuration_qwen2.py): the InternVL language model; q/k/v always have a bias
QWEN2_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                      tie_word_embeddings=False)
# Qwen2VLTextConfig / Qwen2_5_VLTextConfig defaults (the 72B sizes)
QWEN2_VL_TEXT_DEFAULTS = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                              num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=32768,
                              tie_word_embeddings=False)
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
# Gemma2Config (models/gemma2/configuration_gemma2.py): layer_types None -> alternate sliding / full
GEMMA2_DEFAULTS = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                       tie_word_embeddings=True, attention_bias=False, sliding_window=4096, layer_types=None)
# Gemma3TextConfig (models/gemma3/configuration_gemma3.py): layer_types None -> every 6th layer full
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                            tie_word_embeddings=True, attention_bias=False, sliding_window=4096, layer_types=None)
# MllamaTextConfig (models/mllama/configuration_mllama.py)
MLLAMA_TEXT_DEFAULTS = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=40,
                            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                            tie_word_embeddings=False, cross_attention_layers=None)
MLLAMA_CROSS_ATTENTION_LAYERS = (3, 8, 13, 18, 23, 28, 33, 38)  # MllamaTextConfig.__post_init__
# Phi3Config (models/phi3/configuration_phi3.py), whose defaults the remote Phi3VConfig repeats
PHI3_DEFAULTS = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=4096,
                     tie_word_embeddings=False)

# Vision config defaults --------------------------------------------------------------------------------------------
# CLIPVisionConfig (models/clip/configuration_clip.py)
CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=224, patch_size=32, hidden_act="quick_gelu", num_channels=3)
# What LlavaConfig / LlavaNextConfig build when `vision_config` is missing (their sub_configs_defaults init_kwargs)
LLAVA_VISION_FALLBACK = dict(CLIP_VISION_DEFAULTS, intermediate_size=4096, hidden_size=1024, patch_size=14,
                             image_size=336, num_hidden_layers=24, num_attention_heads=16)
# PixtralVisionConfig (models/pixtral/configuration_pixtral.py)
PIXTRAL_VISION_DEFAULTS = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               num_channels=3, image_size=1024, patch_size=16, hidden_act="gelu")
# SiglipVisionConfig (models/siglip/configuration_siglip.py): note the pooling head is on by default
SIGLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                              vision_use_head=True)
# What PaliGemmaConfig builds when `vision_config` is missing (configuration_paligemma.py init_kwargs)
PALIGEMMA_VISION_FALLBACK = dict(SIGLIP_VISION_DEFAULTS, intermediate_size=4096, hidden_size=1152, patch_size=14,
                                 image_size=224, num_hidden_layers=27, num_attention_heads=16, vision_use_head=False)
# Idefics3VisionConfig (models/idefics3/configuration_idefics3.py; SmolVLMVisionConfig has the same defaults)
IDEFICS3_VISION_DEFAULTS = dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                                num_channels=3, image_size=224, patch_size=32, hidden_act="gelu_pytorch_tanh")
# InternVLVisionConfig (models/internvl/configuration_internvl.py)
INTERNVL_VISION_DEFAULTS = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, attention_bias=False,
                                use_qk_norm=False, intermediate_size=4096, hidden_act="gelu", norm_type="layer_norm",
                                image_size=448, patch_size=14, num_channels=3, use_mask_token=False,
                                use_absolute_position_embeddings=True, use_mean_pooling=True)
# MllamaVisionConfig (models/mllama/configuration_mllama.py); image_size 448 here, 560 in the checkpoint
MLLAMA_VISION_DEFAULTS = dict(hidden_size=1280, num_hidden_layers=32, num_global_layers=8, attention_heads=16,
                              num_channels=3, intermediate_size=5120, vision_output_dim=7680, image_size=448,
                              patch_size=14, max_num_tiles=4, intermediate_layers_indices=None,
                              supported_aspect_ratios=None)
MLLAMA_INTERMEDIATE_LAYERS = (3, 7, 15, 23, 30)  # MllamaVisionConfig.__post_init__
MLLAMA_NUM_ASPECT_RATIOS = 8  # [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
# Qwen3VLVisionConfig / Qwen3VLMoeVisionConfig (same defaults)
QWEN3_VL_VISION_DEFAULTS = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3,
                                patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584,
                                num_position_embeddings=2304, deepstack_visual_indexes=(8, 16, 24))

TEXT_DEFAULTS = {"llama": LLAMA_DEFAULTS, "mistral": MISTRAL_DEFAULTS}
# Activation names -> VisionSpec.mlp
_VISION_MLP = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_VISION_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def _with_defaults(cfg: dict, defaults: dict) -> dict:
    merged = dict(defaults)
    merged.update({k: v for k, v in cfg.items() if v is not None or k not in defaults})
    if merged.get("num_key_value_heads") is None and "num_attention_heads" in merged:
        merged["num_key_value_heads"] = merged["num_attention_heads"]
    if not merged.get("head_dim") and "num_attention_heads" in merged:
        merged["head_dim"] = merged["hidden_size"] // merged["num_attention_heads"]
    return merged


def _side(value) -> int:
    """An image/patch size given as an int or as a square [h, w] pair."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise VlplanError(f"non-square sizes {list(value)} are not supported; use a square image/patch size")
        return int(value[0])
    return int(value)


def _layer_pattern(layer_types, default: int) -> int:
    """Every N-th layer is global ("full_attention"); N from an explicit layer_types list, else the class default."""
    if not layer_types:
        return default
    full = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
    if not full:
        raise VlplanError("layer_types has no full_attention layer; vlplan models periodic sliding/global patterns")
    period = full[0] + 1
    if full != list(range(period - 1, len(layer_types), period)):
        raise VlplanError(f"layer_types is not periodic (global layers at {full}); vlplan cannot model that pattern")
    return period


def _layer_types(num_layers: int, pattern: int) -> list[str]:
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]


# Spec -> config.json ------------------------------------------------------------------------------------------------


def _base_text(spec: ModelSpec, model_type: str) -> dict:
    t = spec.text
    return {
        "model_type": model_type, "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim,
        "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": t.tie_word_embeddings,
    }


def _qwen_text_config(spec: ModelSpec, model_type: str) -> dict:
    return dict(_base_text(spec, model_type),
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                hidden_act="silu", rms_norm_eps=1e-6)


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


def _siglip_vision_config(v: VisionSpec, model_type: str = "siglip_vision_model") -> dict:
    config = {"model_type": model_type, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
              "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
              "patch_size": v.patch_size, "hidden_act": "gelu_pytorch_tanh", "num_channels": v.in_channels}
    if model_type == "siglip_vision_model":
        config["vision_use_head"] = v.use_head
    return config


def _vision_feature_layer(v: VisionSpec, default: int) -> int:
    return v.feature_layers[0] if v.feature_layers else default


def _top(spec: ModelSpec, **fields) -> dict:
    return {"model_type": spec.family, "architectures": [spec.hf_class], **fields,
            "tie_word_embeddings": spec.text.tie_word_embeddings, "torch_dtype": spec.dtype}


def spec_to_hf_config(spec: ModelSpec) -> dict:
    """The config dict transformers' `AutoConfig.for_model(**d)` (or `CONFIG_MAPPING[model_type](**d)`) accepts.

    For the remote-code families the dict is their hub config.json layout (no transformers class reads it here).
    """
    v, p, t = spec.vision, spec.projector, spec.text
    writer = _WRITERS.get(spec.family)
    if writer is None:
        raise VlplanError(f"no config writer for family {spec.family!r}")
    return writer(spec, v, p, t)


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


def _write_internvl(spec, v, p, t) -> dict:
    vision = {"model_type": "internvl_vision", "hidden_size": v.hidden_size, "num_hidden_layers": v.num_layers,
              "num_attention_heads": v.num_heads, "intermediate_size": v.intermediate_size,
              "attention_bias": v.qkv_bias, "use_qk_norm": v.qk_norm,
              "norm_type": "rms_norm" if v.norm == "rmsnorm" else "layer_norm", "image_size": [v.image_size] * 2,
              "patch_size": [v.patch_size] * 2, "num_channels": v.in_channels, "use_mean_pooling": not v.post_layernorm,
              "layer_scale_init_value": 0.1, "hidden_act": "gelu"}
    text = dict(_base_text(spec, "qwen2"), hidden_act="silu", rms_norm_eps=1e-6)
    # tie_word_embeddings written explicitly: the InternVLConfig default (True) would tie (see registry/internvl.py)
    return _top(spec, text_config=text, vision_config=vision, image_token_id=spec.image_token_id,
                image_seq_length=spec.processor.tokens_per_view, downsample_ratio=1 / p.pixel_shuffle,
                projector_hidden_act="gelu", vision_feature_layer=_vision_feature_layer(v, -1),
                vision_feature_select_strategy="default")


def _write_gemma3(spec, v, p, t) -> dict:
    text = dict(_base_text(spec, "gemma3_text"), hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                sliding_window=t.sliding_window, layer_types=_layer_types(t.num_layers, t.sliding_window_pattern))
    return _top(spec, text_config=text, vision_config=_siglip_vision_config(v), image_token_index=spec.image_token_id,
                mm_tokens_per_image=spec.processor.tokens_per_view)


def _write_paligemma(spec, v, p, t) -> dict:
    text = dict(_base_text(spec, "gemma2"), hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                sliding_window=t.sliding_window, layer_types=_layer_types(t.num_layers, t.sliding_window_pattern))
    vision = dict(_siglip_vision_config(v), projection_dim=p.out_features)
    return _top(spec, text_config=text, vision_config=vision, image_token_index=spec.image_token_id,
                projection_dim=p.out_features, hidden_size=p.out_features)


def _write_mllama(spec, v, p, t) -> dict:
    vision = {"model_type": "mllama_vision_model", "hidden_size": v.hidden_size, "num_hidden_layers": v.num_layers,
              "num_global_layers": v.num_global_layers, "attention_heads": v.num_heads,
              "num_channels": v.in_channels, "intermediate_size": v.intermediate_size,
              "vision_output_dim": p.in_features, "image_size": v.image_size, "patch_size": v.patch_size,
              "max_num_tiles": v.max_num_tiles, "intermediate_layers_indices": list(v.intermediate_layers_indices)}
    text = dict(_base_text(spec, "mllama_text_model"), cross_attention_layers=list(t.cross_attention_layers))
    text.pop("head_dim")  # MllamaTextConfig derives it from hidden_size / num_attention_heads
    return _top(spec, text_config=text, vision_config=vision, image_token_index=spec.image_token_id)


def _write_idefics3(spec, v, p, t) -> dict:
    vision = _siglip_vision_config(v, f"{spec.family}_vision")
    text = dict(_base_text(spec, "llama"), hidden_act="silu", rms_norm_eps=1e-5)
    return _top(spec, text_config=text, vision_config=vision, image_token_id=spec.image_token_id,
                scale_factor=p.pixel_shuffle)


def _write_minicpmv(spec, v, p, t) -> dict:
    """The hub config.json layout of MiniCPM-V 2.6 (flat Qwen2 keys, a SigLIP vision_config, resampler queries)."""
    return {
        "model_type": "minicpmv", "architectures": ["MiniCPMV"], "version": 2.6,
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
        "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": t.tie_word_embeddings,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "query_num": p.num_queries, "image_size": spec.processor.image_size, "patch_size": spec.processor.patch_size,
        "slice_mode": True, "slice_config": {"max_slice_nums": spec.processor.max_tiles, "model_type": "minicpmv"},
        "drop_vision_last_layer": False, "torch_dtype": spec.dtype,
        "vision_config": {"model_type": "siglip", "hidden_size": v.hidden_size, "image_size": v.image_size,
                          "intermediate_size": v.intermediate_size, "num_attention_heads": v.num_heads,
                          "num_hidden_layers": v.num_layers, "patch_size": v.patch_size},
    }


def _write_phi3_v(spec, v, p, t) -> dict:
    """The hub config.json layout of Phi-3(.5)-vision (flat Phi-3 keys, embd_layer and img_processor dicts)."""
    return {
        "model_type": "phi3_v", "architectures": ["Phi3VForCausalLM"],
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
        "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": t.tie_word_embeddings,
        "hidden_act": "silu", "torch_dtype": spec.dtype,
        "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                       "use_hd_transform": True, "with_learnable_separator": True},
        "img_processor": {"image_dim_out": v.hidden_size, "model_name": "openai/clip-vit-large-patch14-336",
                          "name": "clip_vision_model", "num_img_tokens": spec.processor.tokens_per_view},
    }


_WRITERS = {
    "qwen2_vl": _write_qwen2_vl, "qwen2_5_vl": _write_qwen2_vl, "qwen3_vl": _write_qwen3_vl,
    "qwen3_vl_moe": _write_qwen3_vl, "llava": _write_llava, "llava_next": _write_llava, "internvl": _write_internvl,
    "gemma3": _write_gemma3, "paligemma": _write_paligemma, "mllama": _write_mllama, "idefics3": _write_idefics3,
    "smolvlm": _write_idefics3, "minicpmv": _write_minicpmv, "phi3_v": _write_phi3_v,
}


# config.json -> Spec ------------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise VlplanError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); fix or replace the {what}")
    except OSError as err:
        raise VlplanError(f"cannot read {path}: {err.strerror}")
    if not isinstance(data, dict):
        raise VlplanError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def spec_from_hf_config(path: str | Path) -> ModelSpec:
    path = Path(path).expanduser()
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise VlplanError(f"no config.json at {path}; pass a registry name, a config.json or a model directory")
    cfg = _read_json(config_path, "model config")
    model_type = cfg.get("model_type")
    if not model_type:
        raise VlplanError(f"{config_path} has no model_type; is it a transformers config.json?")
    reader = _READERS.get(model_type)
    if reader is None:
        raise VlplanError(
            f"{config_path}: model_type {model_type!r} is not supported; supported: {', '.join(sorted(_READERS))}"
        )
    _check_language_model_described(cfg, config_path)
    name = config_path.parent.name if config_path.name == "config.json" else config_path.stem
    try:
        spec = reader(cfg, name=name, url=str(config_path.resolve()))
    except VlplanError as err:
        raise VlplanError(f"{config_path}: {err}") from None
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as err:
        raise VlplanError(
            f"{config_path}: cannot read a {model_type} architecture ({type(err).__name__}: {err}); "
            "is the config.json complete?"
        ) from None
    preprocessor = config_path.parent / "preprocessor_config.json"
    if preprocessor.is_file():
        spec = replace(spec, processor=_processor_from_file(spec.processor, _read_json(preprocessor, "processor")))
    return spec


# The sizes that make a language model; a config naming none of them describes no particular model
LANGUAGE_MODEL_SIZE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                            "vocab_size")


def _check_language_model_described(cfg: dict, config_path: Path) -> None:
    """Refuse a config.json with no language-model sizes at all: no `text_config` (transformers writes one, with at
    least its model_type, whenever it saves a composite config, even when every value is a class default) and none
    of `LANGUAGE_MODEL_SIZE_KEYS` at the top level (the flat layout of old Qwen2-VL, MiniCPM-V and Phi-3-vision
    files). Reading it would silently take the text config class's defaults, which are one particular checkpoint's
    sizes (Qwen2_5_VLTextConfig's are the 72B's: `{"model_type": "qwen2_5_vl"}` alone read as a 73 B model). A
    missing vision_config is not refused: the vision defaults are what the family's checkpoints use (every
    Qwen2.5-VL size shares one ViT)."""
    if cfg.get("text_config") is not None or any(key in cfg for key in LANGUAGE_MODEL_SIZE_KEYS):
        return
    raise VlplanError(f"{config_path} describes no language model: it has no text_config and none of "
                      f"{', '.join(LANGUAGE_MODEL_SIZE_KEYS)}, so only the config class's defaults (one particular "
                      "checkpoint's sizes) would be estimated; use the checkpoint's complete config.json")


def _processor_from_file(processor: ProcessorSpec, pre: dict) -> ProcessorSpec:
    """Apply a checkpoint's preprocessor_config.json limits on top of the family's defaults."""
    size = pre.get("size") if isinstance(pre.get("size"), dict) else {}
    if processor.rule == "qwen_smart_resize":
        min_pixels = pre.get("min_pixels", size.get("shortest_edge", processor.min_pixels))
        max_pixels = pre.get("max_pixels", size.get("longest_edge", processor.max_pixels))
        return replace(processor, min_pixels=int(min_pixels), max_pixels=int(max_pixels),
                       patch_size=int(pre.get("patch_size", processor.patch_size)),
                       merge_size=int(pre.get("merge_size", processor.merge_size)))
    if processor.rule == "idefics3_tiles":
        # Idefics3ImageProcessor: size.longest_edge (resize target), max_image_size.longest_edge (tile side; class
        # default 364 when the file omits it, as Idefics3-8B's does since commit 30d4b60)
        tile = (pre.get("max_image_size") or {}).get("longest_edge", processor.image_size)
        return replace(processor, longest_edge=int(size.get("longest_edge", processor.longest_edge)),
                       image_size=int(tile))
    if processor.rule == "internvl_tiles":
        return replace(processor, image_size=int(size.get("height", processor.image_size)),
                       max_tiles=int(pre.get("max_patches", processor.max_tiles)),
                       min_tiles=int(pre.get("min_patches", processor.min_tiles)),
                       crop_to_patches=bool(pre.get("crop_to_patches", processor.crop_to_patches)))
    if processor.rule == "pixtral":
        patch = pre.get("patch_size", processor.patch_size)
        patch = patch.get("height", processor.patch_size) if isinstance(patch, dict) else patch
        return replace(processor, longest_edge=int(size.get("longest_edge", processor.longest_edge)),
                       patch_size=int(patch))
    if processor.rule == "gemma3":
        return replace(processor, do_pan_and_scan=bool(pre.get("do_pan_and_scan") or False))
    if processor.rule == "minicpmv_slices":
        return replace(processor, max_tiles=int(pre.get("max_slice_nums", processor.max_tiles)),
                       image_size=int(pre.get("scale_resolution", processor.image_size)))
    if processor.rule == "phi3v_crops":
        return replace(processor, max_tiles=int(pre.get("num_crops", processor.max_tiles)),
                       tokens_per_view=int(pre.get("num_img_tokens", processor.tokens_per_view)))
    return processor


def _sub_config(cfg: dict, key: str, defaults_by_type: dict, default_type: str, what: str,
                fallback: dict | None = None, aliases: dict | None = None) -> tuple[str, dict]:
    """A text_config / vision_config with its class defaults filled in; (model_type, merged dict).

    A missing sub-config is what the composite config builds from nothing (its class defaults, or `fallback`).
    `aliases` maps other key names to the ones the defaults use (the config class's attribute_map, in reverse).
    """
    sub = cfg.get(key)
    if not isinstance(sub, (dict, type(None))):
        raise VlplanError(f"{key} must be a JSON object, not {type(sub).__name__}")
    model_type = (sub or {}).get("model_type") or default_type
    if sub is None and fallback is not None:
        return model_type, _with_defaults({}, fallback)
    if model_type not in defaults_by_type:
        raise VlplanError(f"a {cfg['model_type']} model with a {model_type!r} {what} is not supported; supported: "
                          f"{', '.join(sorted(defaults_by_type))}")
    sub = dict(sub or {})
    for alias, canonical in (aliases or {}).items():
        if alias in sub and canonical not in sub:
            sub[canonical] = sub.pop(alias)
    return model_type, _with_defaults(sub, defaults_by_type[model_type])


def _feature_layer(cfg: dict, default: int) -> int:
    layer = cfg.get("vision_feature_layer", default)
    if not isinstance(layer, int):
        raise VlplanError(f"vision_feature_layer {layer!r}: only a single feature layer is supported")
    return layer


def _image_token(cfg: dict, default: int) -> int:
    """`image_token_index` or its attribute_map alias `image_token_id` (either name appears in saved files)."""
    return cfg.get("image_token_index", cfg.get("image_token_id", default))


def _text_spec(t: dict, arch: str, **extra) -> TextSpec:
    return TextSpec(arch=arch, num_layers=t["num_hidden_layers"], hidden_size=t["hidden_size"],
                    intermediate_size=t["intermediate_size"], num_heads=t["num_attention_heads"],
                    num_kv_heads=t["num_key_value_heads"], head_dim=t["head_dim"], vocab_size=t["vocab_size"],
                    tie_word_embeddings=bool(t["tie_word_embeddings"]),
                    max_position_embeddings=t["max_position_embeddings"], **extra)


def _tie(cfg: dict, default: bool) -> bool:
    """The file's top-level tie_word_embeddings, else its text_config's, else `default` (class defaults of the text
    config do not count: the top-level config decides what transformers ties)."""
    for where in (cfg, cfg.get("text_config") or {}):
        if where.get("tie_word_embeddings") is not None:
            return bool(where["tie_word_embeddings"])
    return default


def _dtype(cfg: dict, default: str) -> str:
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or default
    return dtype if isinstance(dtype, str) else default


def _llama_family_text(t: dict, text_type: str, *, tie: bool) -> TextSpec:
    if t.get("attention_bias") or t.get("mlp_bias"):
        raise VlplanError("a llama language model with attention_bias/mlp_bias is not supported")
    return _text_spec(dict(t, tie_word_embeddings=tie), "mistral" if text_type == "mistral" else "llama")


def _vision_mlp(act: str, gated: bool = False) -> str:
    if gated:
        return "gated_silu" if act == "silu" else "gated_gelu"
    return _VISION_MLP.get(act, act)


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
    from .registry.qwen2_5_vl import QWEN2_5_VL_VISION
    from .registry.qwen2_vl import QWEN2_VL_PROCESSOR, QWEN2_VL_VISION

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


def _read_qwen3_vl(cfg: dict, *, name: str, url: str) -> ModelSpec:
    from .registry.qwen3_vl import QWEN3_VL_PROCESSOR, QWEN3_VL_VISION, qwen3_merger

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


def _read_llava(cfg: dict, *, name: str, url: str) -> ModelSpec:
    """`llava` and `llava_next`: a CLIP or Pixtral tower, the 2-layer projector, a Llama or Mistral LM."""
    from .registry.llava import CLIP_VIT_L_336, PIXTRAL_VISION
    from .registry.llava_next import LLAVA_NEXT_PROCESSOR

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


def _read_internvl(cfg: dict, *, name: str, url: str) -> ModelSpec:
    from .registry.internvl import INTERN_VIT_300M, INTERNVL_PROCESSOR

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
    # TRAP (registry/internvl.py): transformers 5.23 defaults the top-level tie to True, but the InternVL3 checkpoints
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


def _siglip_vision(vc: dict, base: VisionSpec, arch: str = "siglip") -> VisionSpec:
    return replace(base, arch=arch, num_layers=vc["num_hidden_layers"], hidden_size=vc["hidden_size"],
                   intermediate_size=vc["intermediate_size"], num_heads=vc["num_attention_heads"],
                   patch_size=_side(vc["patch_size"]), image_size=_side(vc["image_size"]),
                   in_channels=vc["num_channels"], mlp=_vision_mlp(vc["hidden_act"]),
                   use_head=bool(vc.get("vision_use_head", False)))


def _read_gemma3(cfg: dict, *, name: str, url: str) -> ModelSpec:
    from .registry.gemma3 import GEMMA3_PROCESSOR, SIGLIP_896

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


def _read_paligemma(cfg: dict, *, name: str, url: str) -> ModelSpec:
    from .registry.paligemma import PALIGEMMA_448_PROCESSOR, SIGLIP_448

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


def _read_mllama(cfg: dict, *, name: str, url: str) -> ModelSpec:
    from .registry.mllama import MLLAMA_PROCESSOR, MLLAMA_VISION

    _, t = _sub_config(cfg, "text_config", {"mllama_text_model": MLLAMA_TEXT_DEFAULTS}, "mllama_text_model",
                       "language model")
    _, vc = _sub_config(cfg, "vision_config", {"mllama_vision_model": MLLAMA_VISION_DEFAULTS},
                        "mllama_vision_model", "vision tower", aliases={"num_attention_heads": "attention_heads"})
    t["head_dim"] = t["hidden_size"] // t["num_attention_heads"]  # MllamaTextConfig has no head_dim
    cross = tuple(t.get("cross_attention_layers") or MLLAMA_CROSS_ATTENTION_LAYERS)
    intermediate = tuple(vc.get("intermediate_layers_indices") or MLLAMA_INTERMEDIATE_LAYERS)
    ratios = len(vc.get("supported_aspect_ratios") or ()) or MLLAMA_NUM_ASPECT_RATIOS
    # MllamaConfig has no tie_word_embeddings field: untied unless the file sets one at the top level
    text = _text_spec(dict(t, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False))), "mllama",
                      cross_attention_layers=cross, extra_embedding_rows=8)
    vision = replace(MLLAMA_VISION, num_layers=vc["num_hidden_layers"], num_global_layers=vc["num_global_layers"],
                     hidden_size=vc["hidden_size"], intermediate_size=vc["intermediate_size"],
                     num_heads=vc["attention_heads"], patch_size=_side(vc["patch_size"]),
                     image_size=_side(vc["image_size"]), in_channels=vc["num_channels"],
                     max_num_tiles=vc["max_num_tiles"], num_aspect_ratios=ratios,
                     intermediate_layers_indices=intermediate)
    return ModelSpec(
        name=name, family="mllama", hf_id=cfg.get("_name_or_path", name), source_url=url,
        hf_class="MllamaForConditionalGeneration", vision=vision,
        projector=ProjectorSpec(arch="mllama_linear", in_features=vc["vision_output_dim"],
                                out_features=text.hidden_size),
        text=text, processor=replace(MLLAMA_PROCESSOR, patch_size=vision.patch_size, image_size=vision.image_size,
                                     max_tiles=vision.max_num_tiles),
        image_token_id=_image_token(cfg, 128256), dtype=_dtype(cfg, "bfloat16"),
    )


def _read_idefics3(cfg: dict, *, name: str, url: str) -> ModelSpec:
    """`idefics3` (Idefics3-8B, SmolVLM-Instruct) and `smolvlm` (SmolVLM2, SmolVLM-256M/500M): same module set."""
    from .registry.idefics3 import idefics3_vision

    family = cfg["model_type"]
    # Idefics3Config / SmolVLMConfig build LlamaConfig(rms_norm_eps=1e-5) when text_config is missing
    text_type, t = _sub_config(cfg, "text_config", TEXT_DEFAULTS, "llama", "language model")
    _, vc = _sub_config(cfg, "vision_config", {f"{family}_vision": IDEFICS3_VISION_DEFAULTS, family:
                                               IDEFICS3_VISION_DEFAULTS}, f"{family}_vision", "vision tower")
    scale = cfg.get("scale_factor", 2)
    vision = _siglip_vision(vc, idefics3_vision(_side(vc["image_size"])), arch="idefics3")
    text = _llama_family_text(t, text_type, tie=_tie(cfg, False))
    tokens = (vision.image_size // vision.patch_size) ** 2 // scale**2
    return ModelSpec(
        name=name, family=family, hf_id=cfg.get("_name_or_path", name), source_url=url,
        hf_class="SmolVLMForConditionalGeneration" if family == "smolvlm" else "Idefics3ForConditionalGeneration",
        vision=vision,
        projector=ProjectorSpec(arch="idefics3", in_features=vision.hidden_size * scale**2,
                                out_features=text.hidden_size, bias=False, pixel_shuffle=scale),
        text=text,
        # size.longest_edge is 4 tiles in every Idefics3/SmolVLM preprocessor seen (1456, 1536, 2048)
        processor=ProcessorSpec(rule="idefics3_tiles", patch_size=vision.patch_size, merge_size=scale,
                                image_size=vision.image_size, longest_edge=4 * vision.image_size,
                                tokens_per_view=tokens),
        image_token_id=cfg.get("image_token_id", 128257), dtype=_dtype(cfg, "bfloat16"),
    )


def _read_minicpmv(cfg: dict, *, name: str, url: str) -> ModelSpec:
    """MiniCPM-V 2.6 remote config: flat Qwen2 keys plus vision_config (SigLIP), query_num and slice_config."""
    from .registry.minicpmv import SPECS as MINICPMV_SPECS

    if cfg.get("version", 2.6) != 2.6:
        raise VlplanError(f"MiniCPM-V version {cfg.get('version')} is not supported; only 2.6 is modelled")
    base = MINICPMV_SPECS[0]
    t = _with_defaults({k: v for k, v in cfg.items() if k != "vision_config"}, QWEN2_DEFAULTS)
    vc = _with_defaults(cfg.get("vision_config") or {}, SIGLIP_VISION_DEFAULTS)
    text = _text_spec(t, "qwen2", qkv_bias=True)
    vision = _siglip_vision(dict(vc, vision_use_head=False), base.vision)  # the NaViT SigLIP has no pooling head
    if cfg.get("drop_vision_last_layer"):
        vision = replace(vision, num_layers=vision.num_layers - 1)
    slices = (cfg.get("slice_config") or {}).get("max_slice_nums", base.processor.max_tiles)
    queries = cfg.get("query_num", 64)
    return ModelSpec(
        name=name, family="minicpmv", hf_id=cfg.get("_name_or_path", name), source_url=url, hf_class="",
        vision=vision,
        projector=replace(base.projector, in_features=vision.hidden_size, hidden_features=text.hidden_size,
                          out_features=text.hidden_size, num_queries=queries, num_heads=text.hidden_size // 128),
        text=text,
        processor=replace(base.processor, patch_size=cfg.get("patch_size", 14),
                          image_size=cfg.get("image_size", 448), max_tiles=slices, tokens_per_view=queries),
        dtype=_dtype(cfg, "bfloat16"), unverified=base.unverified,
    )


def _read_phi3_v(cfg: dict, *, name: str, url: str) -> ModelSpec:
    """Phi-3(.5)-vision remote config: flat Phi-3 keys plus embd_layer / img_processor (CLIP ViT-L/14-336)."""
    from .registry.phi3_v import SPECS as PHI3_V_SPECS

    base = PHI3_V_SPECS[0]
    embd, img = cfg.get("embd_layer") or {}, cfg.get("img_processor") or {}
    if not (embd.get("use_hd_transform") and embd.get("projection_cls") == "mlp"):
        raise VlplanError("only Phi-3-vision's HD-transform MLP projector (embd_layer.use_hd_transform, "
                          "projection_cls mlp) is supported")
    t = _with_defaults(cfg, PHI3_DEFAULTS)
    text = _text_spec(t, "phi3")
    dim_out = img.get("image_dim_out", base.vision.hidden_size)
    return ModelSpec(
        name=name, family="phi3_v", hf_id=cfg.get("_name_or_path", name), source_url=url, hf_class="",
        vision=base.vision,
        projector=replace(base.projector, in_features=dim_out * 4, hidden_features=text.hidden_size,
                          out_features=text.hidden_size),
        text=text,
        processor=replace(base.processor, tokens_per_view=img.get("num_img_tokens", base.processor.tokens_per_view)),
        dtype=_dtype(cfg, "bfloat16"), unverified=base.unverified,
    )


_READERS = {
    "qwen2_vl": _read_qwen2_vl, "qwen2_5_vl": _read_qwen2_vl, "qwen3_vl": _read_qwen3_vl,
    "qwen3_vl_moe": _read_qwen3_vl, "llava": _read_llava, "llava_next": _read_llava, "internvl": _read_internvl,
    "gemma3": _read_gemma3, "paligemma": _read_paligemma, "mllama": _read_mllama, "idefics3": _read_idefics3,
    "smolvlm": _read_idefics3, "minicpmv": _read_minicpmv, "phi3_v": _read_phi3_v,
}
