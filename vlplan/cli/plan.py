"""`vlplan plan`: launch settings for a GPU budget, with reasons, runners-up and time estimates.

Host RAM: a plan that offloads to the CPU must fit the node's RAM too. The budget per node is `--host-ram-gib` when
given; else this machine's RAM when the plan is for this machine; else the GPU type's stated assumption
(planner/hardware.py `host_ram_budget` says when a plan is for this machine, `HOST_RAM_PER_GPU` the assumptions).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import typer

from vlplan.planner.errors import VlplanError
from vlplan.planner.hardware import host_ram_budget
from vlplan.planner.plan import Plan, plan

from .options import errors, setup_command
from .render import console, gib, print_json, table


@setup_command
def plan_command(
    setup,
    resolved,
    global_batch_size: int = typer.Option(..., "--global-batch-size", "-g",
                                          help="Samples per optimizer step over all GPUs."),
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
                                help="When nothing fits, switch on memory levers that leave the training math "
                                     "unchanged (Liger's fused loss, the vision tower's checkpointing, offloaded "
                                     "checkpointing), with the reason."),
    explain: bool = typer.Option(False, "--explain", help="Show the reasons and assumptions in full."),
    export_llamafactory: Path = typer.Option(None, "--export-llamafactory", metavar="OUT.yaml",
                                             help="Write the plan as a LLaMA-Factory training YAML (with its "
                                                  "DeepSpeed JSON next to it when ZeRO is on)."),
    export_deepspeed: Path = typer.Option(None, "--export-deepspeed", metavar="DS.json",
                                          help="Write the plan's DeepSpeed config (ZeRO stage, offload, buffers)."),
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

    from vlplan.planner.plan import NothingFits

    with errors():
        if export_llamafactory is not None and setup.stack != "llamafactory" and "stack" not in resolved.typed:
            # LLaMA-Factory will prepare the model it trains from the export its own way: plan for that stack
            setup = replace(setup, stack="llamafactory")
            typer.echo("warning: planning for LLaMA-Factory's stack, which trains the exported YAML (--stack vlplan "
                       "to plan for vlplan run)", err=True)
        base = _input_yaml(resolved)
        host_bytes, host_source = host_ram_budget(setup, host_ram_gib)
        planned_epochs = epochs if epochs is not None else _yaml_epochs(base)
        try:
            result = plan(setup, global_batch_size=global_batch_size, margin=margin,
                          num_samples=num_samples or None, epochs=planned_epochs,
                          mfu=None if mfu == 0 else mfu,  # 0: the default by attention kernel
                          host_ram_bytes=host_bytes, host_ram_source=host_source, levers=levers)
        except NothingFits as err:
            if json_:
                print_json({"fits": False, "error": str(err)})
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        written, notes = write_exports(result.setup, llamafactory=export_llamafactory, deepspeed=export_deepspeed,
                                       hf_args=export_hf_args, version=llamafactory_version, overwrite=overwrite,
                                       base=base, epochs=epochs)
    for note in notes:
        typer.echo(f"warning: {note}", err=True)
    if confirm:
        from .profile import confirm_and_render

        confirm_and_render(result, explain, confirm_backend, json_,
                           {**resolved.json_extras(), "exported": [str(p) for p in written]}, written)
        return
    if json_:
        print_json({**result.to_dict(), **resolved.json_extras(), "exported": [str(p) for p in written]})
        return
    render_plan(result, explain)
    for path in written:
        console.print(f"wrote {path}")


def _input_yaml(resolved) -> dict | None:
    """The --from-llamafactory YAML the plan started from (its keys are kept in the exported YAML)."""
    from vlplan.planner.io.llamafactory import load_yaml

    path = resolved.sources.get("llamafactory")
    return load_yaml(path) if path else None


def _yaml_epochs(base: dict | None) -> float:
    value = (base or {}).get("num_train_epochs")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return 1.0


def write_exports(setup, *, llamafactory: Path | None, deepspeed: Path | None, hf_args: Path | None,
                  version: str = "latest", overwrite: bool = False, base: dict | None = None,
                  epochs: float | None = None) -> tuple[list[Path], list[str]]:
    """Write the requested config files for `setup`, and return them with notes for the user (placeholders to fill,
    keys of the input YAML the plan removed). The YAML is a complete training file (`training_yaml`: every key of
    `base` the plan does not decide is kept). With ZeRO on, the YAML and the TrainingArguments point at the
    DeepSpeed JSON (`deepspeed` if given, else LLaMA-Factory's file name next to them, written too). Existing files
    are kept unless `overwrite`; all contents are built, and every file written to a temporary name, before any is
    put in place, so a failure leaves nothing behind."""
    from vlplan.planner.io.deepspeed import deepspeed_config
    from vlplan.planner.io.hf_args import training_arguments
    from vlplan.planner.io.llamafactory import default_deepspeed_name, training_yaml

    files: dict[Path, str] = {}
    notes: list[str] = []
    from .outputs import check_output_file

    for path, flag in ((llamafactory, "--export-llamafactory"), (deepspeed, "--export-deepspeed"),
                       (hf_args, "--export-hf-args")):
        if path is not None:
            check_output_file(path, flag)  # a folder, a read-only folder: one line before anything is built
    if hf_args is not None:
        from vlplan.planner.io.hf_args import check_exportable

        check_exportable(setup)
    uses_deepspeed = setup.zero > 0 or setup.offload != "none"
    ds_path = deepspeed
    if uses_deepspeed and ds_path is None and (llamafactory is not None or hf_args is not None):
        ds_path = (llamafactory or hf_args).parent / default_deepspeed_name(setup)
    if ds_path is not None and (uses_deepspeed or deepspeed is not None):
        if not uses_deepspeed:
            raise VlplanError("the plan does not use DeepSpeed (ZeRO 0, no offload): drop --export-deepspeed")
        files[ds_path] = json.dumps(deepspeed_config(setup), indent=2) + "\n"
    ds_ref = str(ds_path.resolve()) if uses_deepspeed and ds_path is not None else None
    if llamafactory is not None:
        exported = training_yaml(setup, version=version, base=base, deepspeed_path=ds_ref, epochs=epochs)
        if llamafactory in files:
            raise VlplanError(f"{llamafactory} is named for two exports; give each its own file")
        files[llamafactory] = exported.text(version)
        for key in exported.placeholders:
            notes.append(f"{llamafactory}: {key} is a placeholder ({exported.config[key]}); set it before training")
        if exported.removed:
            notes.append(f"{llamafactory}: removed {', '.join(exported.removed)} from the input YAML (the plan "
                         "decides them, or LLaMA-Factory "
                         f"{'latest' if version == 'latest' else 'v' + version} does not accept them)")
    if hf_args is not None:
        if hf_args in files:
            raise VlplanError(f"{hf_args} is named for two exports; give each its own file")
        files[hf_args] = json.dumps(training_arguments(setup, deepspeed_path=ds_ref), indent=2) + "\n"
    existing = [str(path) for path in files if path.exists()]
    if existing and not overwrite:
        raise VlplanError(f"{', '.join(existing)} already exist(s); choose another path or pass --overwrite")
    for path in files:
        if not path.parent.is_dir():
            raise VlplanError(f"directory {path.parent} does not exist; create it or choose another path")
    staged: list[tuple[Path, Path]] = []
    try:
        for path, text in files.items():
            tmp = path.with_name(f".{path.name}.tmp")
            staged.append((tmp, path))
            tmp.write_text(text)
        for tmp, path in staged:
            os.replace(tmp, path)
    except OSError as err:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise VlplanError(f"cannot write {path}: {err.strerror or err}") from None
    return list(files), notes


def render_plan(result: Plan, explain: bool) -> None:
    s, e = result.setup, result.chosen.estimate
    d = result.to_dict()
    rows = [["micro-batch per GPU", s.batch_size], ["gradient accumulation", s.gradient_accumulation_steps],
            ["GPUs", f"{s.num_gpus} x {s.num_nodes} node(s) of {s.gpu.name}"],
            ["global batch", result.global_batch_size], ["ZeRO stage", s.zero], ["offload", s.offload],
            ["gradient checkpointing", "on" if s.gradient_checkpointing else "off"], ["attention", s.attn],
            ["peak per GPU", f"{gib(e.peak_bytes)} of {gib(result.capacity_bytes)} ({e.peak_phase})"],
            ["host RAM per node", f"{gib(e.cpu_ram_bytes)} of {gib(result.host_ram_budget_bytes)} "
                                  f"({_host_ram_label(result)})"],
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
