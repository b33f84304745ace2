"""Synthetic batch builders, one module per family, each exporting `BUILDERS = {model_type: fn(setup, model)}`.

`fn` returns the dict of real CPU tensors the processor and collator would produce for the setup's images and
sequence length (see profiler/batch.py). Modules are discovered automatically.
"""

from __future__ import annotations

import importlib
import pkgutil

BUILDERS: dict = {}


def _load() -> None:
    for info in pkgutil.iter_modules(__path__):
        BUILDERS.update(importlib.import_module(f"{__name__}.{info.name}").BUILDERS)
