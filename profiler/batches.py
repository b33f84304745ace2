"""Synthetic batch builders: each family's `batch.py` (planner/families/<family>/batch.py, a torch leaf module the
planner never imports) exports `BUILDERS = {model_type: fn(setup, model)}`, found through the family registry.

`fn` returns the dict of real CPU tensors the processor and collator would produce for the setup's images and
sequence length (see profiler/batch.py). Modules are imported on demand.
"""

from __future__ import annotations

import importlib

from vlplan.planner.families import family_of


def builder_for(family: str):
    record = family_of(family)
    path = record.module("batch") if record else None
    if path is None:
        return None
    return importlib.import_module(path).BUILDERS.get(family)
