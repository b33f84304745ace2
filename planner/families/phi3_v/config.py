"""Phi-3(.5)-vision (remote code): the config.json reader and writer (`READERS` / `WRITERS`, by model_type).

The shared helpers and the reading/writing entry points are in planner/hf_config.py; each defaults dict here
names the transformers configuration file whose class defaults it repeats.
"""

from __future__ import annotations

from dataclasses import replace

from ...errors import VlplanError
from ...hf_config import _dtype, _text_spec, _with_defaults
from ...modules import LANGUAGE, PROJECTOR, VISION
from ...spec import ModelSpec, ProcessorSpec

# Phi3Config (models/phi3/configuration_phi3.py), whose defaults the remote Phi3VConfig repeats
PHI3_DEFAULTS = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=4096,
                     tie_word_embeddings=False)


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


def _read_phi3_v(cfg: dict, *, name: str, url: str) -> ModelSpec:
    """Phi-3(.5)-vision remote config: flat Phi-3 keys plus embd_layer / img_processor (CLIP ViT-L/14-336)."""
    from .specs import SPECS as PHI3_V_SPECS

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


# Where each component lives (modules.py): names from the hub's modeling_phi3_v.py Phi3VForCausalLM, not checked
# against a transformers class
COMPONENT_PREFIXES = {"phi3_v": (("model.vision_embed_tokens.img_processor", VISION),
                                 ("model.vision_embed_tokens", PROJECTOR), ("model", LANGUAGE), ("lm_head", LANGUAGE))}

def _phi3_v_preprocessor(processor: ProcessorSpec, pre: dict, size: dict) -> ProcessorSpec:
    """Phi-3-vision's image processor: crops and tokens per crop
    (`size`: the size dict of the checkpoint's preprocessor_config.json)."""
    return replace(processor, max_tiles=int(pre.get("num_crops", processor.max_tiles)),
                   tokens_per_view=int(pre.get("num_img_tokens", processor.tokens_per_view)))

READERS = {"phi3_v": _read_phi3_v}
WRITERS = {"phi3_v": _write_phi3_v}
# preprocessor_config.json readers, by ProcessorSpec.rule (hf_config.spec_from_hf_config)
PREPROCESSOR_READERS = {"phi3v_crops": _phi3_v_preprocessor}
