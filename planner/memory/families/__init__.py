"""One module per family: a `BaseModel` subclass mirroring the transformers forward, exported as `MODELS`.

Modules are imported on demand (`model_for(family)`), so one family's module never affects another's.
"""

from __future__ import annotations

import importlib

from ...errors import VlplanError

# family (transformers model_type) -> module of this package
FAMILY_MODULES = {
    "qwen2_vl": "qwen_vl", "qwen2_5_vl": "qwen_vl", "qwen3_vl": "qwen3_vl", "qwen3_vl_moe": "qwen3_vl",
    "llava": "llava", "llava_next": "llava_next", "internvl": "internvl", "gemma3": "gemma3", "mllama": "mllama",
    "idefics3": "idefics3", "smolvlm": "idefics3", "paligemma": "paligemma", "minicpmv": "minicpmv",
    "phi3_v": "phi3_v",
}


def family_module(family: str):
    name = FAMILY_MODULES.get(family)
    if name is None:
        raise VlplanError(f"no activation model for family {family!r}")
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"{__name__}.{name}":
            raise VlplanError(f"no activation model for family {family!r} yet") from None
        raise


def model_for(family: str):
    return family_module(family).MODELS[family]


def layer_counts(spec):
    from ..model import layer_counts as default

    return getattr(family_module(spec.family), "layer_counts", default)(spec)


def spec_with_layers(spec, counts):
    from ..model import spec_with_layers as default

    return getattr(family_module(spec.family), "spec_with_layers", default)(spec, counts)


def base_layer_counts(setup, real: dict[str, int], base: int = 2) -> dict[str, int]:
    """The fewest layers per type whose structure matches the full model's, for extrapolation: `base` of each type,
    and with `--method freeze` one frozen language-model layer before the trainable ones."""
    counts = {kind: min(n, base) for kind, n in real.items()}
    if setup.method == "freeze" and "text" in real:
        counts["text"] = min(real["text"], max(base, setup.freeze_trainable_layers + 1))
    return counts
