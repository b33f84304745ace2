"""`vlplan models`: the registry."""

from __future__ import annotations

import typer

from vlplan.planner.modules import param_counts
from vlplan.planner.registry import all_specs

from .render import console, print_json, table

TITLE = "models (parameters in billions)"


def models_command(json_: bool = typer.Option(False, "--json", help="Print JSON.")):
    """List the registry's models with their parameters per component."""
    data = []
    for spec in all_specs():
        data.append({"name": spec.name, "family": spec.family, "hf_id": spec.hf_id, "source_url": spec.source_url,
                     "params": param_counts(spec), "unverified": spec.unverified})
    if json_:
        print_json(data)
        return
    billions = [[f"{m['params'][part] / 1e9:.3f}" for part in ("vision", "projector", "language", "total")]
                for m in data]
    wide = table(TITLE, ["name", "family", "hub id", "vision", "projector", "language", "total", "unverified"],
                 [[m["name"], m["family"], m["hf_id"], *b, "yes" if m["unverified"] else ""]
                  for m, b in zip(data, billions)], {3, 4, 5, 6})
    if console.measure(wide, options=console.options.update(max_width=10**4)).maximum <= console.width:
        console.print(wide)
        return
    # A narrow terminal (80 columns): names and numbers whole, the hub id folds, the unverified ones listed below
    console.print(table(TITLE, ["name", "hub id", "vision", "proj.", "LM", "total"],
                        [[m["name"], m["hf_id"], *b] for m, b in zip(data, billions)], {2, 3, 4, 5}))
    unverified = [m["name"] for m in data if m["unverified"]]
    if unverified:
        console.print(f"unverified (sizes not yet checked against the checkpoint's config.json): "
                      f"{', '.join(unverified)}")
