"""Conversion between `ModelSpec` and transformers `config.json` dicts, without importing transformers.

`spec_to_hf_config(spec)` writes the config a transformers class builds the model from (used by the tracer and the
tests). `spec_from_hf_config(path)` reads a local `config.json` (or a model directory holding one, plus its
`preprocessor_config.json`). Saved configs drop every value equal to the class default (transformers
`PretrainedConfig.to_diff_dict`), so each reader below fills in the defaults of the transformers config class it
mirrors; `tests/test_hf_config.py` checks them against transformers' own diff-saved configs.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from .errors import VlplanError
from .spec import ModelSpec, ProcessorSpec, ProjectorSpec, TextSpec, VisionSpec

# transformers LlamaConfig defaults (models/llama/configuration_llama.py)
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=2048,
                      tie_word_embeddings=False, head_dim=None, attention_bias=False)
# MistralConfig defaults (models/mistral/configuration_mistral.py)
MISTRAL_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                        tie_word_embeddings=False, head_dim=None)
# Qwen2VLTextConfig / Qwen2_5_VLTextConfig defaults (the 72B sizes)
QWEN2_VL_TEXT_DEFAULTS = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                              num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=32768,
                              tie_word_embeddings=False)
# CLIPVisionConfig as LlavaConfig fills it in when `vision_config` is missing, else the CLIPVisionConfig defaults
CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=224, patch_size=32, hidden_act="quick_gelu", num_channels=3)
LLAVA_VISION_FALLBACK = dict(CLIP_VISION_DEFAULTS, intermediate_size=4096, hidden_size=1024, patch_size=14,
                             image_size=336, num_hidden_layers=24, num_attention_heads=16)

TEXT_DEFAULTS = {"llama": LLAMA_DEFAULTS, "mistral": MISTRAL_DEFAULTS}


def _with_defaults(cfg: dict, defaults: dict) -> dict:
    merged = dict(defaults)
    merged.update({k: v for k, v in cfg.items() if v is not None or k not in defaults})
    if merged.get("num_key_value_heads") is None:
        merged["num_key_value_heads"] = merged["num_attention_heads"]
    if not merged.get("head_dim"):
        merged["head_dim"] = merged["hidden_size"] // merged["num_attention_heads"]
    return merged


# Spec -> config.json ------------------------------------------------------------------------------------------------


def _qwen_text_config(spec: ModelSpec, model_type: str) -> dict:
    t = spec.text
    return {
        "model_type": model_type, "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
        "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": t.tie_word_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "hidden_act": "silu", "rms_norm_eps": 1e-6,
    }


def _llama_text_config(spec: ModelSpec) -> dict:
    t = spec.text
    model_type = "mistral" if t.arch == "mistral" else "llama"
    return {
        "model_type": model_type, "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim,
        "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": t.tie_word_embeddings,
        "hidden_act": "silu", "rms_norm_eps": 1e-5,
    }


def spec_to_hf_config(spec: ModelSpec) -> dict:
    """The config dict transformers' `AutoConfig.for_model(**d)` (or `CONFIG_MAPPING[model_type](**d)`) accepts."""
    v = spec.vision
    if spec.family in ("qwen2_vl", "qwen2_5_vl"):
        vision = {"model_type": f"{spec.family}_vision" if spec.family == "qwen2_vl" else "qwen2_5_vl_vision",
                  "depth": v.num_layers, "num_heads": v.num_heads, "patch_size": v.patch_size,
                  "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
                  "in_channels": v.in_channels}
        if spec.family == "qwen2_vl":
            vision.update(embed_dim=v.hidden_size, hidden_size=spec.projector.out_features,
                          mlp_ratio=v.intermediate_size // v.hidden_size, hidden_act="quick_gelu")
        else:
            vision.update(hidden_size=v.hidden_size, out_hidden_size=spec.projector.out_features,
                          intermediate_size=v.intermediate_size, hidden_act="silu", window_size=v.window_size,
                          fullatt_block_indexes=list(v.fullatt_block_indexes), tokens_per_second=2)
        return {
            "model_type": spec.family, "architectures": [spec.hf_class],
            "text_config": _qwen_text_config(spec, f"{spec.family}_text"), "vision_config": vision,
            "image_token_id": spec.image_token_id, "video_token_id": spec.image_token_id + 1,
            "vision_start_token_id": spec.image_token_id - 3, "vision_end_token_id": spec.image_token_id - 2,
            "tie_word_embeddings": spec.text.tie_word_embeddings, "torch_dtype": spec.dtype,
        }
    if spec.family == "llava":
        return {
            "model_type": "llava", "architectures": [spec.hf_class],
            "vision_config": {"model_type": "clip_vision_model", "hidden_size": v.hidden_size,
                              "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
                              "num_attention_heads": v.num_heads, "image_size": v.image_size,
                              "patch_size": v.patch_size, "hidden_act": "quick_gelu", "projection_dim": 768},
            "text_config": _llama_text_config(spec),
            "image_token_index": spec.image_token_id, "projector_hidden_act": "gelu",
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
            "multimodal_projector_bias": spec.projector.bias, "image_seq_length": spec.processor.tokens_per_view,
            "tie_word_embeddings": spec.text.tie_word_embeddings, "torch_dtype": spec.dtype,
        }
    raise VlplanError(f"no transformers config writer for family {spec.family!r}")


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
    name = config_path.parent.name if config_path.name == "config.json" else config_path.stem
    spec = reader(cfg, name=name, url=str(config_path.resolve()))
    preprocessor = config_path.parent / "preprocessor_config.json"
    if preprocessor.is_file():
        spec = replace(spec, processor=_processor_from_file(spec.processor, _read_json(preprocessor, "processor")))
    return spec


def _processor_from_file(processor: ProcessorSpec, pre: dict) -> ProcessorSpec:
    """Apply a checkpoint's preprocessor_config.json limits on top of the family's defaults."""
    if processor.rule == "qwen_smart_resize":
        size = pre.get("size") or {}
        min_pixels = pre.get("min_pixels", size.get("shortest_edge", processor.min_pixels))
        max_pixels = pre.get("max_pixels", size.get("longest_edge", processor.max_pixels))
        return replace(processor, min_pixels=int(min_pixels), max_pixels=int(max_pixels),
                       patch_size=int(pre.get("patch_size", processor.patch_size)),
                       merge_size=int(pre.get("merge_size", processor.merge_size)))
    return processor


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
        dtype=cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16",
    )


def _read_llava(cfg: dict, *, name: str, url: str) -> ModelSpec:
    from .registry.llava import CLIP_VIT_L_336

    text_cfg = cfg.get("text_config") or {}
    text_type = text_cfg.get("model_type", "llama")
    if text_type not in TEXT_DEFAULTS:
        raise VlplanError(f"{url}: LLaVA with a {text_type!r} language model is not supported")
    t = _with_defaults(text_cfg, TEXT_DEFAULTS[text_type])
    vc = cfg.get("vision_config")
    vc = _with_defaults(vc, CLIP_VISION_DEFAULTS) if vc is not None else dict(LLAVA_VISION_FALLBACK)
    if vc.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise VlplanError(f"{url}: LLaVA with a {vc['model_type']!r} vision tower is not supported")
    vision = replace(CLIP_VIT_L_336, num_layers=vc["num_hidden_layers"], hidden_size=vc["hidden_size"],
                     intermediate_size=vc["intermediate_size"], num_heads=vc["num_attention_heads"],
                     patch_size=vc["patch_size"], image_size=vc["image_size"])
    grid = (vision.image_size // vision.patch_size) ** 2
    strategy = cfg.get("vision_feature_select_strategy", "default")
    return ModelSpec(
        name=name, family="llava", hf_id=cfg.get("_name_or_path", name), source_url=url,
        hf_class="LlavaForConditionalGeneration", vision=vision,
        projector=ProjectorSpec(arch="mlp2x_gelu", in_features=vision.hidden_size, hidden_features=t["hidden_size"],
                                out_features=t["hidden_size"], bias=cfg.get("multimodal_projector_bias", True)),
        text=TextSpec(arch="mistral" if text_type == "mistral" else "llama", num_layers=t["num_hidden_layers"],
                      hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                      num_heads=t["num_attention_heads"], num_kv_heads=t["num_key_value_heads"],
                      head_dim=t["head_dim"], vocab_size=t["vocab_size"],
                      tie_word_embeddings=bool(cfg.get("tie_word_embeddings") or t["tie_word_embeddings"]),
                      max_position_embeddings=t["max_position_embeddings"]),
        processor=ProcessorSpec(rule="fixed", patch_size=vision.patch_size, image_size=vision.image_size,
                                tokens_per_view=grid if strategy == "default" else grid + 1),
        image_token_id=cfg.get("image_token_index", 32000), dtype=cfg.get("torch_dtype") or "float16",
    )


_READERS = {"qwen2_vl": _read_qwen2_vl, "qwen2_5_vl": _read_qwen2_vl, "llava": _read_llava}
