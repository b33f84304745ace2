"""`vlplan gpus`: the GPU catalog."""

from __future__ import annotations

import typer

from vlplan.planner.hardware import CATALOG

from .render import console, print_json, table


def gpus_command(json_: bool = typer.Option(False, "--json", help="Print JSON.")):
    """List GPU ids with usable memory, dense bf16 TFLOP/s and bandwidth."""
    data = [{"name": g.name, "aliases": list(g.aliases), "description": g.description, "memory_mib": g.memory_mib,
             "memory_bytes": g.memory_bytes, "tflops_bf16": g.tflops_bf16, "bandwidth_gbps": g.bandwidth_gbps,
             "bf16": g.bf16} for g in CATALOG]
    if json_:
        print_json(data)
        return
    rows = [[g["name"], ", ".join(g["aliases"]), g["description"], g["memory_mib"], g["tflops_bf16"],
             g["bandwidth_gbps"], "yes" if g["bf16"] else "no"] for g in data]
    console.print(table("GPUs", ["id", "aliases", "model", "memory MiB", "bf16 TFLOP/s", "GB/s", "bf16"], rows,
                        {3, 4, 5}))
