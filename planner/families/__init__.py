"""The model families vlplan models, registered in one place: one `Family` record per folder of this package.

A family folder holds everything that is the family's own, one module per part:

    specs.py   `SPECS`: the registry entries (literal `ModelSpec`s, each after the URL of its config.json)
    config.py  `READERS` / `WRITERS`: {model_type: fn} between `ModelSpec` and transformers' config.json;
               `COMPONENT_PREFIXES`: where vision / projector / language live in the transformers model;
               `PREPROCESSOR_READERS` (optional): {rule: fn}, the preprocessor_config.json limits it reads
    tokens.py  `RULES`: {ProcessorSpec.rule: fn}, the image-to-token rule of its image processor
    memory.py  `MODELS`: {model_type: BaseModel subclass}, the activation model mirroring the transformers forward
               (optionally `layer_counts` / `spec_with_layers` for models with more than one layer type)
    batch.py   `BUILDERS`: {model_type: fn(setup, model)}, the synthetic batch the tracer feeds (imports torch)
    tiny.py    the tiny random model `vlplan tiny-model` writes (imports torch and transformers)

A part may be another folder's module (Qwen2.5-VL reuses Qwen2-VL's config reader and memory model): the record
names each part by its module path under this package, `None` where the family has none (the remote-code families
have no synthetic batch: the tracer cannot build their models).

The planner never imports torch (tests/test_layers.py). `batch` and `tiny` are the torch parts: leaf modules that
only the profiler and the runner import, by the module path this record gives (`Family.module(part)`); no planner
module imports them, which tests/test_layers.py checks statically. Keeping them here, rather than in a parallel
profiler/families/ tree, keeps a family in one folder; the cost is that the wheel ships files the light (no-torch)
install never imports. How to add a family: docs/adding-a-family.md.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

# The parts that import torch: only the profiler and the runner import them
TORCH_PARTS = ("batch", "tiny")
PARTS = ("specs", "config", "tokens", "memory", *TORCH_PARTS)


@dataclass(frozen=True)
class Family:
    """One folder of this package and the transformers `model_type`s its parts serve.

    Each part is a module path relative to this package ("qwen2_vl.memory"); "" means the folder's own module of that
    name (`<folder>.<part>`), None means the family has no such part.
    """

    folder: str
    model_types: tuple[str, ...]
    config: str | None = ""
    tokens: str | None = ""
    memory: str | None = ""
    batch: str | None = ""
    tiny: str | None = None
    # LLaMA-Factory's mm plugin is Qwen2VLPlugin or a subclass (Qwen3VLPlugin): a 28 px minimum side and a capped
    # aspect ratio on top of the generic pre-resize, and `<|vision_start|><image><|vision_end|>` as the image text
    qwen2vl_plugin: bool = False

    def module(self, part: str) -> str | None:
        """The absolute module path of `part` (None when the family has none)."""
        if part not in PARTS:
            raise ValueError(f"unknown family part {part!r}; parts: {', '.join(PARTS)}")
        relative = "" if part == "specs" else getattr(self, part)
        if relative is None:
            return None
        return f"{__name__}.{relative or f'{self.folder}.{part}'}"


# The registry. Order is the order of `vlplan models`.
FAMILIES: tuple[Family, ...] = (
    Family("qwen2_vl", ("qwen2_vl",), tokens=None, tiny="qwen2_vl.tiny", qwen2vl_plugin=True),
    Family("qwen2_5_vl", ("qwen2_5_vl",), config="qwen2_vl.config", tokens=None, memory="qwen2_vl.memory",
           batch="qwen2_vl.batch", tiny="qwen2_vl.tiny", qwen2vl_plugin=True),
    Family("qwen3_vl", ("qwen3_vl",), tokens=None, qwen2vl_plugin=True),
    Family("qwen3_vl_moe", ("qwen3_vl_moe",), config="qwen3_vl.config", tokens=None, memory="qwen3_vl.memory",
           batch="qwen3_vl.batch", qwen2vl_plugin=True),
    Family("llava", ("llava",), tiny="llava.tiny"),
    Family("llava_next", ("llava_next",), config="llava.config"),
    Family("internvl", ("internvl",)),
    Family("gemma3", ("gemma3",)),
    Family("mllama", ("mllama",)),
    Family("idefics3", ("idefics3", "smolvlm")),
    Family("paligemma", ("paligemma",)),
    Family("minicpmv", ("minicpmv",), batch=None),
    Family("phi3_v", ("phi3_v",), batch=None),
)

# transformers model_type -> its Family (remote-code families use their remote `model_type`)
BY_MODEL_TYPE: dict[str, Family] = {model_type: family for family in FAMILIES for model_type in family.model_types}
MODEL_TYPES: tuple[str, ...] = tuple(BY_MODEL_TYPE)


def family_of(model_type: str) -> Family | None:
    return BY_MODEL_TYPE.get(model_type)


def part(model_type: str, name: str) -> ModuleType | None:
    """The imported `name` part of `model_type`'s family (None when it has none). Planner parts only: the torch
    parts are imported by the profiler and the runner from `Family.module`."""
    if name in TORCH_PARTS:
        raise ValueError(f"the {name} part imports torch; import Family.module({name!r}) from the profiler/runner")
    family = BY_MODEL_TYPE.get(model_type)
    path = family.module(name) if family else None
    return importlib.import_module(path) if path else None


@lru_cache(maxsize=1)
def spec_modules() -> tuple[ModuleType, ...]:
    """Every folder's specs module, in registry order."""
    return tuple(importlib.import_module(f"{__name__}.{family.folder}.specs") for family in FAMILIES)


@lru_cache(maxsize=1)
def token_rules() -> dict:
    """ProcessorSpec.rule -> fn(processor, width, height), from every family's tokens module (`RULES`)."""
    rules: dict = {}
    for family in FAMILIES:
        path = family.module("tokens")
        if path:
            rules.update(importlib.import_module(path).RULES)
    return rules
