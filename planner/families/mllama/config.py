"""Llama 3.2 Vision (Mllama): the config.json reader and writer (`READERS` / `WRITERS`, by model_type).

The shared helpers and the reading/writing entry points are in planner/hf_config.py; each defaults dict here
names the transformers configuration file whose class defaults it repeats.
"""

from __future__ import annotations

from dataclasses import replace

from ...hf_config import _base_text, _dtype, _image_token, _side, _sub_config, _text_spec, _top
from ...modules import LANGUAGE, PROJECTOR, VISION
from ...spec import ModelSpec, ProjectorSpec

# MllamaTextConfig (models/mllama/configuration_mllama.py)
MLLAMA_TEXT_DEFAULTS = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=40,
                            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                            tie_word_embeddings=False, cross_attention_layers=None)


MLLAMA_CROSS_ATTENTION_LAYERS = (3, 8, 13, 18, 23, 28, 33, 38)  # MllamaTextConfig.__post_init__


# MllamaVisionConfig (models/mllama/configuration_mllama.py); image_size 448 here, 560 in the checkpoint
MLLAMA_VISION_DEFAULTS = dict(hidden_size=1280, num_hidden_layers=32, num_global_layers=8, attention_heads=16,
                              num_channels=3, intermediate_size=5120, vision_output_dim=7680, image_size=448,
                              patch_size=14, max_num_tiles=4, intermediate_layers_indices=None,
                              supported_aspect_ratios=None)


MLLAMA_INTERMEDIATE_LAYERS = (3, 7, 15, 23, 30)  # MllamaVisionConfig.__post_init__


MLLAMA_NUM_ASPECT_RATIOS = 8  # [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]


def _write_mllama(spec, v, p, t) -> dict:
    vision = {"model_type": "mllama_vision_model", "hidden_size": v.hidden_size, "num_hidden_layers": v.num_layers,
              "num_global_layers": v.num_global_layers, "attention_heads": v.num_heads,
              "num_channels": v.in_channels, "intermediate_size": v.intermediate_size,
              "vision_output_dim": p.in_features, "image_size": v.image_size, "patch_size": v.patch_size,
              "max_num_tiles": v.max_num_tiles, "intermediate_layers_indices": list(v.intermediate_layers_indices)}
    text = dict(_base_text(spec, "mllama_text_model"), cross_attention_layers=list(t.cross_attention_layers))
    text.pop("head_dim")  # MllamaTextConfig derives it from hidden_size / num_attention_heads
    return _top(spec, text_config=text, vision_config=vision, image_token_index=spec.image_token_id)


def _read_mllama(cfg: dict, *, name: str, url: str) -> ModelSpec:
    from .specs import MLLAMA_PROCESSOR, MLLAMA_VISION

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


# Where each component lives in the transformers model (module-name prefixes, most specific first; modules.py)
COMPONENT_PREFIXES = {"mllama": (("model.multi_modal_projector", PROJECTOR), ("model.vision_model", VISION),
                                 ("model.language_model", LANGUAGE), ("lm_head", LANGUAGE))}

READERS = {"mllama": _read_mllama}
WRITERS = {"mllama": _write_mllama}
