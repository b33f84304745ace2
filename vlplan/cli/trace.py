"""`vlplan trace`: the exact live-tensor peak of a real training step, traced on the CPU with fake tensors."""

from __future__ import annotations

import typer

from .options import errors, setup_command
from .render import console, gib, print_json, table


@setup_command
def trace_command(setup, resolved, layers: int = typer.Option(0, "--layers", help="Trace N layers of each type and "
                                                                          "extrapolate (0: automatic)."),
                  full: bool = typer.Option(False, "--full", help="Trace every layer (slow for large models)."),
                  json_: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Trace one training step of the real transformers/peft model on fake tensors (no GPU, no weights)."""
    with errors():
        try:
            from vlplan import trace
        except ImportError as err:
            from vlplan.planner.errors import VlplanError

            raise VlplanError(f"trace needs torch and transformers ({err.name} is missing): pip install "
                              "'vlplan[trace]'") from None
        result = trace(setup, layers=layers or None, full=full)
    if json_:
        print_json({**result.to_dict(), **resolved.json_extras()})
        return
    rows = [[name, gib(value)] for name, value in sorted(result.breakdown_bytes.items(), key=lambda kv: -kv[1])]
    console.print(table(f"trace: breakdown at the peak ({result.peak_phase})", ["term", "bytes"], rows, {1}))
    console.print(table("by category", ["category", "bytes"],
                        [[k, gib(v)] for k, v in sorted(result.by_category.items(), key=lambda kv: -kv[1])], {1}))
    console.print(f"live-tensor peak {gib(result.allocated_peak_bytes)} in {result.peak_phase}; with the estimator's "
                  f"device overheads {gib(result.peak_bytes)}; traced {layer_runs(result.layers_traced)} in "
                  f"{result.seconds:.1f} s{' (extrapolated to every layer)' if result.extrapolated else ''}")
    for note in result.emulated:
        console.print(f"emulated on the CPU: {note}")
    if result.host_offloaded_bytes:
        console.print(f"checkpointed inputs in host RAM: {gib(result.host_offloaded_bytes)} per GPU")


def layer_runs(runs: list[dict[str, int]]) -> str:
    """[{'text': 1, 'vision': 1}, {'text': 2, 'vision': 1}] -> '1 text + 1 vision layers; 2 text + 1 vision
    layers' (the layers of each traced model)."""
    return "; ".join(" + ".join(f"{count} {kind}" for kind, count in run.items()) + " layers" for run in runs)
