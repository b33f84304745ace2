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
from .families import MODEL_TYPES
from .spec import ModelSpec, ProcessorSpec, TextSpec, VisionSpec

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

# Vision config defaults --------------------------------------------------------------------------------------------
# SiglipVisionConfig (models/siglip/configuration_siglip.py): note the pooling head is on by default
SIGLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                              vision_use_head=True)

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


def _part_table(model_type: str, table: str) -> dict:
    """The family's `READERS` or `WRITERS` (planner/families/<family>/config.py); empty for an unknown model_type."""
    from .families import part

    module = part(model_type, "config")
    return getattr(module, table) if module else {}


def spec_to_hf_config(spec: ModelSpec) -> dict:
    """The config dict transformers' `AutoConfig.for_model(**d)` (or `CONFIG_MAPPING[model_type](**d)`) accepts.

    For the remote-code families the dict is their hub config.json layout (no transformers class reads it here).
    """
    v, p, t = spec.vision, spec.projector, spec.text
    writer = _part_table(spec.family, "WRITERS").get(spec.family)
    if writer is None:
        raise VlplanError(f"no config writer for family {spec.family!r}")
    return writer(spec, v, p, t)


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
    reader = _part_table(model_type, "READERS").get(model_type)
    if reader is None:
        raise VlplanError(
            f"{config_path}: model_type {model_type!r} is not supported; supported: {', '.join(sorted(MODEL_TYPES))}"
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
        spec = replace(spec, processor=_processor_from_file(spec.family, spec.processor,
                                                              _read_json(preprocessor, "processor")))
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


def _processor_from_file(model_type: str, processor: ProcessorSpec, pre: dict) -> ProcessorSpec:
    """Apply a checkpoint's preprocessor_config.json limits on top of the family's defaults (the family config.py's
    `PREPROCESSOR_READERS` for the processor's rule; a rule with no reader keeps the family's values)."""
    from .families import part

    size = pre.get("size") if isinstance(pre.get("size"), dict) else {}
    reader = getattr(part(model_type, "config"), "PREPROCESSOR_READERS", {}).get(processor.rule)
    return reader(processor, pre, size) if reader else processor


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


def _siglip_vision(vc: dict, base: VisionSpec, arch: str = "siglip") -> VisionSpec:
    return replace(base, arch=arch, num_layers=vc["num_hidden_layers"], hidden_size=vc["hidden_size"],
                   intermediate_size=vc["intermediate_size"], num_heads=vc["num_attention_heads"],
                   patch_size=_side(vc["patch_size"]), image_size=_side(vc["image_size"]),
                   in_channels=vc["num_channels"], mlp=_vision_mlp(vc["hidden_act"]),
                   use_head=bool(vc.get("vision_use_head", False)))


