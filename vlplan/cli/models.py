"""`vlplan models`: the registry."""

from __future__ import annotations

import typer

from vlplan.planner.modules import param_counts
from vlplan.planner.registry import all_specs

from .render import console, print_json, table


def models_command(json_: bool = typer.Option(False, "--json", help="Print JSON.")):
    """List the registry's models with their parameters per component."""
    rows, data = [], []
    for spec in all_specs():
        counts = param_counts(spec)
        data.append({"name": spec.name, "family": spec.family, "hf_id": spec.hf_id, "source_url": spec.source_url,
                     "params": counts, "unverified": spec.unverified})
        rows.append([spec.name, spec.family, spec.hf_id, f"{counts['vision'] / 1e9:.3f}",
                     f"{counts['projector'] / 1e9:.3f}", f"{counts['language'] / 1e9:.3f}",
                     f"{counts['total'] / 1e9:.3f}", "yes" if spec.unverified else ""])
    if json_:
        print_json(data)
        return
    console.print(table("models (parameters in billions)", ["name", "family", "hub id", "vision", "projector",
                                                             "language", "total", "unverified"], rows, {3, 4, 5, 6}))
