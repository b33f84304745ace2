"""Helpers that build transformers models from vlplan specs: the outside oracle the planner is tested against."""

from __future__ import annotations

import torch
import transformers

from vlplan.planner.hf_config import spec_to_hf_config
from vlplan.planner.modules import component_of
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


def hf_param_counts(spec: ModelSpec) -> dict[str, int]:
    model = meta_model(spec)
    counts = {"vision": 0, "projector": 0, "language": 0}
    for name, param in model.named_parameters():  # tied parameters are listed once
        counts[component_of(spec.family, name)] += param.numel()
    counts["total"] = sum(counts.values())
    return counts
