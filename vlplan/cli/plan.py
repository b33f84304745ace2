"""`vlplan plan`: launch settings for a GPU budget, with reasons, runners-up and time estimates."""

from __future__ import annotations

import typer

from vlplan.planner.plan import Plan, plan

from .options import errors, setup_command
from .render import console, gib, print_json, table


@setup_command
def plan_command(
    setup,
    global_batch_size: int = typer.Option(..., "--global-batch-size", "-g",
                                          help="Samples per optimizer step over all GPUs."),
    margin: float = typer.Option(0.10, "--margin", help="Keep the estimated peak below capacity x (1 - margin)."),
    num_samples: int = typer.Option(0, "--num-samples", help="Dataset size, for time per epoch and GPU-hours."),
    epochs: float = typer.Option(1.0, "--epochs", help="Epochs, for GPU-hours."),
    mfu: float = typer.Option(0.0, "--mfu", help="Model FLOPs utilization to assume (default 0.40 fused / 0.30 "
                                                  "eager attention)."),
    explain: bool = typer.Option(False, "--explain", help="Show the reasons and assumptions in full."),
    json_: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Choose micro-batch, accumulation, checkpointing, ZeRO stage and offload for a global batch on your GPUs.

    Keeps micro-batch x accumulation x data-parallel GPUs = the global batch, keeps the estimated peak within
    the margin, and maximizes estimated throughput (FLOPs model: stated MFU, recomputation, ZeRO communication,
    offload bandwidth). Exits 1 with what would fit when nothing does.
    """
    from vlplan.planner.plan import NothingFits

    with errors():
        try:
            result = plan(setup, global_batch_size=global_batch_size, margin=margin,
                          num_samples=num_samples or None, epochs=epochs, mfu=mfu or None)
        except NothingFits as err:
            if json_:
                print_json({"fits": False, "error": str(err)})
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
    if json_:
        print_json(result.to_dict())
        return
    render_plan(result, explain)


def render_plan(result: Plan, explain: bool) -> None:
    s, e = result.setup, result.chosen.estimate
    d = result.to_dict()
    rows = [["micro-batch per GPU", s.batch_size], ["gradient accumulation", s.gradient_accumulation_steps],
            ["GPUs", f"{s.num_gpus} x {s.num_nodes} node(s) of {s.gpu.name}"],
            ["global batch", result.global_batch_size], ["ZeRO stage", s.zero], ["offload", s.offload],
            ["gradient checkpointing", "on" if s.gradient_checkpointing else "off"], ["attention", s.attn],
            ["peak per GPU", f"{gib(e.peak_bytes)} of {gib(result.capacity_bytes)} ({e.peak_phase})"],
            ["step time", f"{result.step_time_s:.2f} s"]]
    if d["epoch_time_s"] is not None:
        rows.append(["time per epoch", f"{d['epoch_time_s'] / 3600:.2f} h"])
        rows.append(["GPU-hours", f"{d['gpu_hours']:.1f}"])
    console.print(table(f"plan for {s.model.name} {s.method}", ["setting", "value"], rows))
    for reason in result.reasons if explain else result.reasons[:3]:
        console.print(f"- {reason}")
    if result.alternatives:
        alt = [[c.setup.batch_size, c.setup.gradient_accumulation_steps, c.setup.zero, c.setup.offload,
                "on" if c.setup.gradient_checkpointing else "off", gib(c.estimate.peak_bytes),
                f"{c.time.seconds:.2f} s"] for c in result.alternatives]
        console.print(table("runners-up", ["micro", "accum", "ZeRO", "offload", "ckpt", "peak", "step"], alt,
                            {0, 1, 5, 6}))
    if explain:
        console.print(f"assumptions: {result.assumptions}")
