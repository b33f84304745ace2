"""One module per family: a `BaseModel` subclass mirroring the transformers forward, registered in `MODELS`.

Modules are discovered automatically: a new family is a new file defining `MODELS = {model_type: class}`.
"""

from __future__ import annotations

import importlib
import pkgutil

MODELS: dict = {}
for _info in pkgutil.iter_modules(__path__):
    MODELS.update(importlib.import_module(f"{__name__}.{_info.name}").MODELS)


def family_module(family: str):
    """The module modelling `family` (for its optional `layer_counts` / `spec_with_layers` overrides)."""
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if family in module.MODELS:
            return module
    return None


def layer_counts(spec):
    from ..model import layer_counts as default

    module = family_module(spec.family)
    return getattr(module, "layer_counts", default)(spec)


def spec_with_layers(spec, counts):
    from ..model import spec_with_layers as default

    module = family_module(spec.family)
    return getattr(module, "spec_with_layers", default)(spec, counts)
