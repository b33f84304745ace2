"""Helpers that build transformers models from vlplan specs: the outside oracle the planner is tested against."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from functools import lru_cache
from pathlib import Path

import torch
import transformers

from vlplan.planner.hf_config import spec_to_hf_config
from vlplan.planner.modules import COMPONENTS, component_of
from vlplan.planner.spec import ModelSpec


def hf_config(spec: ModelSpec):
    d = dict(spec_to_hf_config(spec))
    model_type = d.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **d)


def meta_model(spec: ModelSpec):
    config = hf_config(spec)
    cls = getattr(transformers, spec.hf_class)
    with torch.device("meta"):
        return cls._from_config(config)


@dataclasses.dataclass(frozen=True)
class HfInventory:
    """What the transformers model holds, per component: parameter counts and its nn.Linear modules."""

    params: dict[str, int]
    # component -> Counter of (last name component, in_features, out_features, has bias)
    linears: dict[str, Counter]


def model_inventory(model, family: str, *, tied_lm_head: bool) -> HfInventory:
    params = {component: 0 for component in COMPONENTS}
    for name, param in model.named_parameters():  # tied parameters are listed once
        params[component_of(family, name)] += param.numel()
    params["total"] = sum(params.values())
    linears = {component: Counter() for component in COMPONENTS}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):  # also nn.MultiheadAttention's out_proj
            continue
        if name == "lm_head" and tied_lm_head:  # its weight is the embedding's: no parameters of its own
            continue
        key = (name.rsplit(".", 1)[-1], module.in_features, module.out_features, module.bias is not None)
        linears[component_of(family, name)][key] += 1
    return HfInventory(params, linears)


@lru_cache(maxsize=None)
def hf_inventory(spec: ModelSpec) -> HfInventory:
    """Built once per spec (on the meta device: no memory, no weights) and shared by the tests."""
    return model_inventory(meta_model(spec), spec.family, tied_lm_head=spec.text.tie_word_embeddings)


def hf_param_counts(spec: ModelSpec) -> dict[str, int]:
    return hf_inventory(spec).params


def _field_defaults(cls) -> dict:
    """The dataclass field defaults of a transformers config class (None and factories left out)."""
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING and f.default is not None:
            defaults[f.name] = list(f.default) if isinstance(f.default, tuple) else f.default
    return defaults


def strip_defaults(config) -> dict:
    """config.json as transformers 4.x saved it for hub checkpoints: every key equal to its config class's field
    default is dropped, inside text_config / vision_config too (model_type always kept). Harsher than 5.23's
    `to_diff_dict`, which keeps most model-specific keys; readers must survive both."""

    def strip(cfg, as_dict: dict) -> dict:
        defaults = _field_defaults(type(cfg))
        out = {}
        for key, value in as_dict.items():
            sub = getattr(cfg, key, None)
            if isinstance(sub, transformers.PreTrainedConfig):
                out[key] = strip(sub, value)
            elif key == "model_type" or key not in defaults or defaults[key] != value:
                out[key] = value
        out["model_type"] = cfg.model_type
        return out

    return strip(config, config.to_dict())


def write_config(directory: Path, config: dict | transformers.PreTrainedConfig, *, use_diff: bool = True) -> Path:
    """A config.json in `directory` (a transformers config saved by transformers, or a plain dict)."""
    path = Path(directory) / "config.json"
    if isinstance(config, transformers.PreTrainedConfig):
        config.to_json_file(path, use_diff=use_diff)
    else:
        path.write_text(json.dumps(config, indent=2, default=str))
    return path
