"""The model registry: the families' literal specs indexed by name, hub id and alias (case-insensitive).

`resolve(name)` accepts a registry name (`qwen2.5-vl-7b`), a hub id (`Qwen/Qwen2.5-VL-7B-Instruct`), an alias, or a
path to a local `config.json` / model directory. Unknown names fail with the closest names suggested.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path

from .errors import VlplanError
from .spec import ModelSpec
from .families import spec_modules


@lru_cache(maxsize=1)
def all_specs() -> tuple[ModelSpec, ...]:
    """Every family's registry entries (planner/families/<family>/specs.py), in the family registry's order."""
    return tuple(spec for module in spec_modules() for spec in module.SPECS)


@lru_cache(maxsize=1)
def _index() -> dict[str, ModelSpec]:
    index: dict[str, ModelSpec] = {}
    for spec in all_specs():
        for key in (spec.name, spec.hf_id, *spec.aliases):
            key = key.lower()
            if key in index and index[key] is not spec:
                raise RuntimeError(f"registry key {key!r} names two specs")
            index[key] = spec
    return index


def names() -> list[str]:
    return [spec.name for spec in all_specs()]


def resolve(name: str) -> ModelSpec:
    key = name.strip().lower()
    if not key:
        raise VlplanError("--model is empty; pass a registry name (see `vlplan models`), a hub id or a config path")
    spec = _index().get(key)
    if spec is not None:
        return spec
    path = Path(name).expanduser()
    if path.exists():
        return ModelSpec.from_hf_config(path)
    # `Qwen/Qwen2.5-VL-7B-Instruct` written without the org, or with a trailing -Instruct / -hf
    for candidate in (key.split("/")[-1], key.split("/")[-1].removesuffix("-instruct").removesuffix("-hf")):
        for spec in all_specs():
            if candidate in (spec.name, spec.hf_id.lower().split("/")[-1]):
                return spec
    close = difflib.get_close_matches(key.split("/")[-1], [*names(), *(k for k in _index() if "/" in k)], n=4,
                                      cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run `vlplan models` for the list"
    raise VlplanError(f"unknown model {name!r}{hint} (a local config.json or model directory also works)")
