"""Idefics3 and SmolVLM: the config.json reader and writer (`READERS` / `WRITERS`, by model_type).

The shared helpers and the reading/writing entry points are in planner/hf_config.py; each defaults dict here
names the transformers configuration file whose class defaults it repeats.
"""

from __future__ import annotations

from dataclasses import replace

from ...hf_config import (
    TEXT_DEFAULTS,
    _base_text,
    _dtype,
    _llama_family_text,
    _side,
    _siglip_vision,
    _siglip_vision_config,
    _sub_config,
    _tie,
    _top,
)
from ...modules import LANGUAGE, PROJECTOR, VISION
from ...spec import ModelSpec, ProcessorSpec, ProjectorSpec

# Idefics3VisionConfig (models/idefics3/configuration_idefics3.py; SmolVLMVisionConfig has the same defaults)
IDEFICS3_VISION_DEFAULTS = dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                                num_channels=3, image_size=224, patch_size=32, hidden_act="gelu_pytorch_tanh")


def _write_idefics3(spec, v, p, t) -> dict:
    vision = _siglip_vision_config(v, f"{spec.family}_vision")
    text = dict(_base_text(spec, "llama"), hidden_act="silu", rms_norm_eps=1e-5)
    return _top(spec, text_config=text, vision_config=vision, image_token_id=spec.image_token_id,
                scale_factor=p.pixel_shuffle)


def _read_idefics3(cfg: dict, *, name: str, url: str) -> ModelSpec:
    """`idefics3` (Idefics3-8B, SmolVLM-Instruct) and `smolvlm` (SmolVLM2, SmolVLM-256M/500M): same module set."""
    from .specs import idefics3_vision

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


# Where each component lives in the transformers model (module-name prefixes, most specific first; modules.py)
IDEFICS3_STYLE = (("model.connector", PROJECTOR), ("model.vision_model", VISION), ("model.text_model", LANGUAGE),
                  ("lm_head", LANGUAGE))
COMPONENT_PREFIXES = {"idefics3": IDEFICS3_STYLE, "smolvlm": IDEFICS3_STYLE}

def _idefics3_preprocessor(processor: ProcessorSpec, pre: dict, size: dict) -> ProcessorSpec:
    """Idefics3ImageProcessor: the resize target and the tile side
    (`size`: the size dict of the checkpoint's preprocessor_config.json)."""
    # Idefics3ImageProcessor: size.longest_edge (resize target), max_image_size.longest_edge (tile side; class
    # default 364 when the file omits it, as Idefics3-8B's does since commit 30d4b60)
    tile = (pre.get("max_image_size") or {}).get("longest_edge", processor.image_size)
    return replace(processor, longest_edge=int(size.get("longest_edge", processor.longest_edge)),
                   image_size=int(tile))

READERS = {"idefics3": _read_idefics3, "smolvlm": _read_idefics3}
WRITERS = {"idefics3": _write_idefics3, "smolvlm": _write_idefics3}
# preprocessor_config.json readers, by ProcessorSpec.rule (hf_config.spec_from_hf_config)
PREPROCESSOR_READERS = {"idefics3_tiles": _idefics3_preprocessor}
