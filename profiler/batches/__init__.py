"""Synthetic batch builders, one module per family, each exporting `BUILDERS = {model_type: fn(setup, model)}`.

`fn` returns the dict of real CPU tensors the processor and collator would produce for the setup's images and
sequence length (see profiler/batch.py). Modules are imported on demand.
"""

from __future__ import annotations

import importlib

from vlplan.planner.memory.families import FAMILY_MODULES


def builder_for(family: str):
    name = FAMILY_MODULES.get(family)
    if name is None:
        return None
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"{__name__}.{name}":
            return None
        raise
    return module.BUILDERS.get(family)
