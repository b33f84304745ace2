"""`vlplan plan`: launch settings for a GPU budget, with reasons, runners-up and time estimates.

Host RAM: a plan that offloads to the CPU must fit the node's RAM too. The budget per node is `--host-ram-gib` when
given; else this machine's RAM when the plan is for this machine; else the GPU type's stated assumption
(planner/hardware.py `host_ram_budget` says when a plan is for this machine, `HOST_RAM_PER_GPU` the assumptions).
"""

from __future__ import annotations

import os

import sys
from pathlib import Path

import typer

from vlplan import plan
from vlplan.planner.errors import VlplanError
from vlplan.planner.hardware import host_ram_budget
from vlplan.planner.plan import Plan

from .options import errors, setup_command
from .render import console, gib, gib_or_dash, print_json, table


@setup_command(auto_sharding=True)
def plan_command(
    setup,
    resolved,
    global_batch_size: int = typer.Option(None, "--global-batch-size", "-g",
                                          help="Samples per optimizer step over all GPUs (required unless "
                                               "--maximize keeps the batch settings fixed)."),
    maximize: str = typer.Option(None, "--maximize", metavar="SETTING",
                                 help="image-max-pixels | cutoff-len | micro-batch: the largest value whose estimate "
                                      "fits the budget with the margin (exact bisection), the other settings fixed "
                                      "as given, or planned with --global-batch-size; with --dataset, what it costs "
                                      "the data (images resized, samples cut)."),
    margin: float = typer.Option(0.10, "--margin", help="Keep the estimated peak below capacity x (1 - margin)."),
    num_samples: int = typer.Option(0, "--num-samples", help="Dataset size, for time per epoch and GPU-hours."),
    epochs: float = typer.Option(None, "--epochs", help="Epochs, for GPU-hours and the exported YAML's "
                                                        "num_train_epochs (default: the --from-llamafactory YAML's "
                                                        "num_train_epochs, else 1)."),
    mfu: float = typer.Option(0.0, "--mfu", help="Model FLOPs utilization to assume (default 0.40 fused / 0.30 "
                                                  "eager attention)."),
    host_ram_gib: float = typer.Option(None, "--host-ram-gib", help="Host RAM per node (GiB) that the training "
                                                                   "processes and CPU offload may use (default: this "
                                                                   "machine's RAM when the plan is for this machine, "
                                                                   "else an assumption per GPU type)."),
    levers: bool = typer.Option(True, "--levers/--no-levers",
                                help="When nothing fits, or only DeepSpeed CPU offload does, switch on memory levers "
                                     "that leave the training math unchanged (Liger's fused loss, the vision tower's "
                                     "checkpointing, offloaded checkpointing), with the reason."),
    explain: bool = typer.Option(False, "--explain", help="Show the reasons and assumptions in full."),
    export_llamafactory: Path = typer.Option(None, "--export-llamafactory", metavar="OUT.yaml",
                                             help="Write the plan as a LLaMA-Factory training YAML (with its "
                                                  "DeepSpeed JSON next to it when ZeRO is on)."),
    export_deepspeed: Path = typer.Option(None, "--export-deepspeed", metavar="DS.json",
                                          help="Write the plan's DeepSpeed config (ZeRO stage, offload, buffers)."),
    export_accelerate: Path = typer.Option(None, "--export-accelerate", metavar="FSDP.yaml",
                                           help="Write the plan's accelerate config (FSDP2) for `accelerate launch "
                                                "--config_file` (written next to the YAML when the plan uses FSDP)."),
    export_hf_args: Path = typer.Option(None, "--export-hf-args", metavar="ARGS.json",
                                        help="Write the plan's transformers TrainingArguments as JSON."),
    llamafactory_version: str = typer.Option("latest", "--llamafactory-version",
                                             help="LLaMA-Factory version the YAML is for (0.9.0 ... latest)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing export files."),
    confirm: bool = typer.Option(False, "--confirm", help="After planning, measure the chosen micro-batch (and the "
                                                          "next one up) in short `vlplan profile` runs on the GPU."),
    confirm_backend: str = typer.Option("cuda", "--confirm-backend", help="With --confirm: cuda | cpu (the profile's "
                                                                          "test/dev backend)."),
    json_: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Choose micro-batch, accumulation, checkpointing, ZeRO stage and offload for a global batch on your GPUs.

    Keeps micro-batch x accumulation x data-parallel GPUs = the global batch, keeps the estimated peak within
    the margin, and maximizes estimated throughput (FLOPs model: stated MFU, recomputation, ZeRO communication,
    offload bandwidth). Exits 1 with what would fit when nothing does. With --confirm, two short GPU runs of the
    profile code check the chosen micro-batch and the next one up against the margin (exit 1 if the chosen one
    does not hold, or no CUDA GPU is there to check it).
    """
    from dataclasses import replace

    from vlplan.planner.io.exports import write_exports, yaml_epochs
    from vlplan.planner.plan import NothingFits
    from vlplan.planner.resolve import expandable_segments_default

    maximized = statement = None
    with errors():
        if export_llamafactory is not None and setup.stack != "llamafactory" and "stack" not in resolved.typed:
            # LLaMA-Factory will prepare the model it trains from the export its own way: plan for that stack
            setup = replace(setup, stack="llamafactory")
            if "expandable_segments" not in resolved.typed:  # and for its launcher's allocator setting
                expandable, _ = expandable_segments_default(setup, os.environ)
                setup = replace(setup, expandable_segments=expandable)
            typer.echo("warning: planning for LLaMA-Factory's stack, which trains the exported YAML (--stack vlplan "
                       "to plan for vlplan run)", err=True)
        base = _input_yaml(resolved)
        host_bytes, host_source = host_ram_budget(setup, host_ram_gib)
        planned_epochs = epochs if epochs is not None else yaml_epochs(base)
        if global_batch_size is None and maximize is None:
            raise VlplanError("--global-batch-size is required (the samples per optimizer step over all GPUs), "
                              "unless --maximize searches one setting with the others fixed")
        try:
            if maximize is not None:  # inverse planning (planner/maximize.py)
                from vlplan.planner.maximize import maximize as maximize_setting, maximized_plan

                maximized = maximize_setting(
                    setup, maximize, margin=margin, scan=resolved.scan, percentile=resolved.percentile,
                    global_batch_size=global_batch_size,
                    images_at_cap=resolved.scan is None and "image_size" not in resolved.typed,
                    host_ram_bytes=host_bytes, host_ram_source=host_source, mfu=None if mfu == 0 else mfu)
                result = maximized_plan(maximized, num_samples=num_samples or None, epochs=planned_epochs,
                                        mfu=None if mfu == 0 else mfu)
            else:
                result = plan(setup, global_batch_size=global_batch_size, margin=margin,
                              num_samples=num_samples or None, epochs=planned_epochs,
                              mfu=None if mfu == 0 else mfu,  # 0: the default by attention kernel
                              host_ram_bytes=host_bytes, host_ram_source=host_source,
                              shardings=("zero", "fsdp") if resolved.auto_sharding else None,
                              levers=levers)
        except NothingFits as err:
            if json_:
                print_json({"fits": False, "error": str(err)})
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        written, notes = write_exports(result.setup, llamafactory=export_llamafactory, deepspeed=export_deepspeed,
                                       hf_args=export_hf_args, version=llamafactory_version, overwrite=overwrite,
                                       base=base, epochs=epochs, accelerate=export_accelerate)
        if resolved.scan is not None:  # the plan against the data's distribution (planner/fit.py)
            from vlplan.planner.fit import data_statement

            statement = data_statement(result.setup, resolved.scan,
                                       int(result.capacity_bytes * (1 - result.margin)))
    for note in notes:
        typer.echo(f"warning: {note}", err=True)
    extras = {}
    if maximized is not None:
        extras["maximize"] = maximized.to_dict()
    if statement is not None:
        extras["data"] = statement
        if not json_:
            for line in statement["notes"]:
                typer.echo(f"data: {line}", err=True)
            for line in statement["warnings"]:
                typer.echo(f"warning: {line}", err=True)
    if confirm:
        confirm_and_render(result, explain, confirm_backend, json_,
                           {**resolved.json_extras(), **extras, "exported": [str(p) for p in written]}, written)
        return
    if json_:
        print_json({**result.to_dict(), **resolved.json_extras(), **extras, "exported": [str(p) for p in written]})
        return
    render_plan(result, explain)
    if maximized is not None:
        console.print(f"largest {maximized.key} that fits: {maximized.value} ({maximized.bound} bound)")
        for reason in maximized.reasons:
            console.print(f"- {reason}")
    for path in written:
        console.print(f"wrote {path}")


def _input_yaml(resolved) -> dict | None:
    """The --from-llamafactory YAML the plan started from (its keys are kept in the exported YAML)."""
    from vlplan.planner.io.llamafactory import load_yaml

    path = resolved.sources.get("llamafactory")
    return load_yaml(path) if path else None


def render_plan(result: Plan, explain: bool) -> None:
    s, e = result.setup, result.chosen.estimate
    d = result.to_dict()
    rows = [["micro-batch per GPU", s.batch_size], ["gradient accumulation", s.gradient_accumulation_steps],
            ["GPUs", f"{s.num_gpus} x {s.num_nodes} node(s) of {s.gpu.name}"],
            ["global batch", result.global_batch_size],
            ["FSDP strategy", s.fsdp] if s.sharding == "fsdp" else ["ZeRO stage", s.zero], ["offload", s.offload],
            ["gradient checkpointing", "on" if s.gradient_checkpointing else "off"], ["attention", s.attn],
            ["peak per GPU", f"{gib(e.peak_bytes)} of {gib(result.capacity_bytes)} ({e.peak_phase})"],
            ["host RAM per node", f"{gib(e.cpu_ram_bytes)} of {gib(result.host_ram_budget_bytes)} "
                                  f"({_host_ram_label(result)})"],
            ["step time", f"{result.step_time_s:.2f} s"]]
    if d["epoch_time_s"] is not None:
        rows.append(["time per epoch", f"{d['epoch_time_s'] / 3600:.2f} h"])
        rows.append(["GPU-hours", f"{d['gpu_hours']:.1f}"])
    console.print(table(f"plan for {s.model.name} {s.method}", ["setting", "value"], rows))
    shown = result.reasons if explain else result.reasons[:3] + [r for r in result.reasons[3:]
                                                                  if r.startswith(("FSDP", "DeepSpeed ZeRO"))]
    for reason in shown:  # the choice between FSDP and ZeRO (--sharding auto) is always shown
        console.print(f"- {reason}")
    if result.alternatives:
        alt = [[c.setup.batch_size, c.setup.gradient_accumulation_steps,
                f"FSDP {c.setup.fsdp}" if c.setup.sharding == "fsdp" else c.setup.zero, c.setup.offload,
                "on" if c.setup.gradient_checkpointing else "off", gib(c.estimate.peak_bytes),
                gib(c.estimate.cpu_ram_bytes), f"{c.time.seconds:.2f} s"] for c in result.alternatives]
        console.print(table("runners-up", ["micro", "accum", "ZeRO", "offload", "ckpt", "peak", "host RAM", "step"],
                            alt, {0, 1, 5, 6, 7}))
    if explain:
        console.print(table("assumptions", ["assumption", "value"],
                            [[ASSUMPTION_LABELS.get(key, key.replace("_", " ")), _assumption_text(key, value)]
                             for key, value in result.assumptions.items()]))


def _host_ram_label(result: Plan) -> str:
    if result.host_ram_assumed:
        return f"assumed for {result.setup.gpu.name}, see --explain"
    return result.host_ram_source.split(" (")[0]


ASSUMPTION_LABELS = {"host_ram_per_node": "host RAM per node", "mfu": "model FLOPs utilization",
                     "micro_step_overhead_s": "overhead per micro-step", "internode_gbps": "bandwidth between nodes",
                     "intranode_gbps": "bandwidth within a node", "pcie_gbps": "PCIe (offload) bandwidth",
                     "cpu_adam_params_per_s": "CPU Adam rate", "overlap": "communication overlap",
                     "tensor_rate_of": "tensor rate of"}


def _assumption_text(key: str, value) -> str:
    if key == "mfu":
        return f"{100 * value:.0f}%"
    if key.endswith("_gbps"):
        return f"{value:g} GB/s"
    if key == "cpu_adam_params_per_s":
        return f"{value:.3g} parameters/s per process"
    if key.endswith("_s") and isinstance(value, (int, float)):
        return f"{value * 1000:g} ms"
    return str(value)


# plan --confirm -----------------------------------------------------------------------------------------------------
def confirm_and_render(plan, explain: bool, backend: str, json_: bool, extras: dict, written: list) -> None:
    """`vlplan plan --confirm`: the plan (as without --confirm), then its confirmation by short profile runs; exit 1
    when the chosen micro-batch does not hold on the device or cannot be checked (no CUDA GPU: one line)."""
    from vlplan.profiler.confirm import confirm_plan

    if not json_:
        render_plan(plan, explain)
        for path in written:
            console.print(f"wrote {path}")
    try:
        if backend not in ("cuda", "cpu"):
            raise VlplanError(f"--confirm-backend {backend!r} is not one of cuda, cpu")
        confirmation = confirm_plan(plan, backend=backend, on_event=_confirm_event)
    except VlplanError as err:
        if json_:
            print_json({**plan.to_dict(), **extras, "confirmation": {"error": str(err)}})
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    if json_:
        print_json({**plan.to_dict(), **extras, "confirmation": confirmation.to_dict()})
    else:
        render_confirmation(confirmation)
    if not confirmation.confirmed:
        raise typer.Exit(1)


def _confirm_event(kind: str, data: dict) -> None:
    label = "the chosen" if data["role"] == "chosen" else "the next"
    print(f"confirming: {label} micro-batch {data['batch_size']} ({CONFIRM_NOTE})...", file=sys.stderr, flush=True)


CONFIRM_NOTE = "a short profile run in its own process"


def render_confirmation(confirmation) -> None:
    for run in confirmation.runs:
        name = f"micro-batch {run.batch_size} ({'chosen' if run.role == 'chosen' else 'next one up'})"
        if run.error:
            console.print(f"{name}: could not be measured: {run.error}")
        elif run.oom:
            console.print(f"{name}: out of memory on {confirmation.device}")
        else:
            verdict = "within" if run.within_budget else "over"
            console.print(f"{name}: measured peak {gib_or_dash(run.compared_bytes)} ({confirmation.measure}; estimate "
                          f"{gib_or_dash(run.record.get('estimate_peak_bytes'))}), {verdict} the budget "
                          f"{gib(run.budget_bytes)}")
    if confirmation.confirmed:
        tail = {True: "; the next one up breaks the margin", False: "; the next one up also fits: the estimate is "
                "conservative here", None: ""}[confirmation.next_breaks]
        console.print(f"[green]confirmed[/green] on {confirmation.device}: micro-batch "
                      f"{confirmation.chosen.batch_size} holds{tail}")
    else:
        console.print(f"[red]not confirmed[/red] on {confirmation.device}: micro-batch "
                      f"{confirmation.chosen.batch_size} does not stay within the budget; plan with a larger "
                      "--margin or a smaller micro-batch")
