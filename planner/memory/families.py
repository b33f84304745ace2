"""The activation model of each family: a `BaseModel` subclass mirroring the transformers forward, in the family's
`memory.py` (`MODELS = {model_type: class}`), found through the family registry (planner/families/__init__.py).

Modules are imported on demand (`model_for(family)`), so one family's module never affects another's.
"""

from __future__ import annotations

from ..errors import VlplanError
from ..families import part


def family_module(family: str):
    module = part(family, "memory")
    if module is None:
        raise VlplanError(f"no activation model for family {family!r}")
    return module


def model_for(family: str):
    return family_module(family).MODELS[family]


def layer_counts(spec):
    from .model import layer_counts as default

    return getattr(family_module(spec.family), "layer_counts", default)(spec)


def spec_with_layers(spec, counts):
    from .model import spec_with_layers as default

    return getattr(family_module(spec.family), "spec_with_layers", default)(spec, counts)


def base_layer_counts(setup, real: dict[str, int], base: int = 2) -> dict[str, int]:
    """The fewest layers per type whose structure matches the full model's, for extrapolation: `base` of each type,
    and with `--method freeze` one frozen language-model layer before the trainable ones."""
    counts = {kind: min(n, base) for kind, n in real.items()}
    if setup.method == "freeze" and "text" in real:
        counts["text"] = min(real["text"], max(base, setup.freeze_trainable_layers + 1))
    return counts
