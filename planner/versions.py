"""The transformers releases the memory model follows, and a one-line warning when another one is installed.

The activation model re-executes the transformers modeling code of one range of releases (the `dev` extra pins it
and the accuracy tests trace it). From 5.24 the multimodal model outputs keep the vision encoder's outputs
(`image_outputs`: its hidden states and features) alive until the loss is computed, which the model does not yet
follow. The check reads the installed distribution's metadata: no import of transformers (the planner stays light).
"""

from __future__ import annotations

import importlib.util
import re

MODELED_TRANSFORMERS = ((5, 0), (5, 24))  # [lowest, first not modeled)
_VERSION = re.compile(r"""^__version__\s*=\s*["']([^"']+)["']""", re.MULTILINE)


def installed_transformers() -> str | None:
    """The installed transformers' `__version__`, read from its __init__.py without importing it (importlib.metadata
    alone costs a cold `vlplan estimate` 35 ms)."""
    try:
        spec = importlib.util.find_spec("transformers")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    try:
        with open(spec.origin, encoding="utf-8") as f:
            found = _VERSION.search(f.read(65536))
    except OSError:
        found = None
    if found:
        return found.group(1)
    from importlib import metadata

    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


def transformers_warning(version: str | None = None) -> str | None:
    """One line when `version` (default: the installed transformers, if any) is outside the modeled releases."""
    version = version if version is not None else installed_transformers()
    if version is None:
        return None
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    (low_major, low_minor), (high_major, high_minor) = MODELED_TRANSFORMERS
    if len(parts) == 2 and (low_major, low_minor) <= parts < (high_major, high_minor):
        return None
    modeled = f">={low_major}.{low_minor},<{high_major}.{high_minor}"
    if len(parts) == 2 and parts < (low_major, low_minor):
        why = "its modeling code predates the releases the estimator follows, so its memory may differ"
        pin = f"pip install -U 'transformers<{high_major}.{high_minor},>={low_major}.{low_minor}'"
    else:
        why = ("from 5.24 the model outputs keep the vision encoder's outputs until the loss, so the loss phase may "
               "differ from the estimate (by up to 0.4% on the 7-8B setups of docs/accuracy.md, whose peaks were "
               "unchanged)")
        pin = f"pip install 'transformers<{high_major}.{high_minor}'"
    return (f"transformers {version} is installed, outside the releases the estimator models ({modeled}): {why}; "
            f"{pin} to train as estimated")
