"""MiniCPM-V 2.6 (remote code): the config.json reader and writer (`READERS` / `WRITERS`, by model_type).

The shared helpers and the reading/writing entry points are in planner/hf_config.py; each defaults dict here
names the transformers configuration file whose class defaults it repeats.
"""

from __future__ import annotations

from dataclasses import replace

from ...errors import VlplanError
from ...hf_config import QWEN2_DEFAULTS, SIGLIP_VISION_DEFAULTS, _dtype, _siglip_vision, _text_spec, _with_defaults
from ...modules import LANGUAGE, PROJECTOR, VISION
from ...spec import ModelSpec, ProcessorSpec


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


def _read_minicpmv(cfg: dict, *, name: str, url: str) -> ModelSpec:
    """MiniCPM-V 2.6 remote config: flat Qwen2 keys plus vision_config (SigLIP), query_num and slice_config."""
    from .specs import SPECS as MINICPMV_SPECS

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


# Where each component lives (modules.py): names from the hub's modeling_minicpmv.py MiniCPMV, not checked against
# a transformers class
COMPONENT_PREFIXES = {"minicpmv": (("resampler", PROJECTOR), ("vpm", VISION), ("llm", LANGUAGE))}

def _minicpmv_preprocessor(processor: ProcessorSpec, pre: dict, size: dict) -> ProcessorSpec:
    """MiniCPM-V's image processor: slice count and scale resolution
    (`size`: the size dict of the checkpoint's preprocessor_config.json)."""
    return replace(processor, max_tiles=int(pre.get("max_slice_nums", processor.max_tiles)),
                   image_size=int(pre.get("scale_resolution", processor.image_size)))

READERS = {"minicpmv": _read_minicpmv}
WRITERS = {"minicpmv": _write_minicpmv}
# preprocessor_config.json readers, by ProcessorSpec.rule (hf_config.spec_from_hf_config)
PREPROCESSOR_READERS = {"minicpmv_slices": _minicpmv_preprocessor}
