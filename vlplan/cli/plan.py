"""`vlplan plan`: launch settings for a GPU budget, with reasons, runners-up and time estimates."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from vlplan.planner.errors import VlplanError
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
    epochs: float = typer.Option(1.0, "--epochs", help="Epochs, for GPU-hours."),
    mfu: float = typer.Option(0.0, "--mfu", help="Model FLOPs utilization to assume (default 0.40 fused / 0.30 "
                                                  "eager attention)."),
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
        written = write_exports(result.setup, llamafactory=export_llamafactory, deepspeed=export_deepspeed,
                                hf_args=export_hf_args, version=llamafactory_version, overwrite=overwrite)
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


def write_exports(setup, *, llamafactory: Path | None, deepspeed: Path | None, hf_args: Path | None,
                  version: str = "latest", overwrite: bool = False) -> list[Path]:
    """Write the requested config files for `setup`. With ZeRO on, the YAML and the TrainingArguments point at the
    DeepSpeed JSON (`deepspeed` if given, else LLaMA-Factory's file name next to them, written too). Existing files
    are kept unless `overwrite`; all contents are built before anything is written."""
    from vlplan.planner.io.deepspeed import deepspeed_config
    from vlplan.planner.io.hf_args import training_arguments
    from vlplan.planner.io.llamafactory import default_deepspeed_name, dump_yaml, llamafactory_yaml

    files: dict[Path, str] = {}
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
        config = llamafactory_yaml(setup, version=version, deepspeed_path=ds_ref)
        files[llamafactory] = dump_yaml(config, version)
    if hf_args is not None:
        files[hf_args] = json.dumps(training_arguments(setup, deepspeed_path=ds_ref), indent=2) + "\n"
    existing = [str(path) for path in files if path.exists()]
    if existing and not overwrite:
        raise VlplanError(f"{', '.join(existing)} already exist(s); choose another path or pass --overwrite")
    for path, text in files.items():
        if not path.parent.is_dir():
            raise VlplanError(f"directory {path.parent} does not exist; create it or choose another path")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return list(files)


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
