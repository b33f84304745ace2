"""`vlplan run`: launch the real fine-tune with the planned settings (its ranks run runner/worker.py)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import typer

from vlplan.planner.errors import VlplanError
from vlplan.runner.job import DEFAULT_EPOCHS

from .options import errors, llamafactory_files, setup_command
from .render import print_json


@llamafactory_files()
@setup_command
def run_command(
    ctx: typer.Context,
    setup,
    resolved,
    output_dir: Path = typer.Option(None, "--output-dir", "-o", help="Where checkpoints, the trained weights and "
                                                                    "vlplan_run.json go (must be empty unless "
                                                                    "--resume or --overwrite). Required unless "
                                                                    "--from-llamafactory names one (output_dir)."),
    plan_file: Path = typer.Option(None, "--plan", help="A plan saved with `vlplan plan ... --json > plan.json`: "
                                                        "train with its settings."),
    global_batch_size: int = typer.Option(None, "--global-batch-size", "-g",
                                          help="Plan micro-batch, accumulation, checkpointing and ZeRO for this "
                                               "global batch before training."),
    max_steps: int = typer.Option(None, "--max-steps", help="Optimizer steps (default: --epochs epochs)."),
    epochs: float = typer.Option(None, "--epochs", help=f"Epochs when --max-steps is not given [default: "
                                                        f"{DEFAULT_EPOCHS:g}]."),
    learning_rate: float = typer.Option(None, "--learning-rate", "--lr",
                                        help="Peak learning rate (default: 1e-4 LoRA, 1e-5 full/freeze, as "
                                             "LLaMA-Factory's examples)."),
    lr_scheduler_type: str = typer.Option(None, "--lr-scheduler-type", help="transformers scheduler name "
                                                                             "[default: cosine]."),
    warmup_ratio: float = typer.Option(None, "--warmup-ratio", help="Warmup as a fraction of the steps "
                                                                    "[default: 0]."),
    warmup_steps: int = typer.Option(None, "--warmup-steps", help="Warmup steps (win over --warmup-ratio) "
                                                                  "[default: 0]."),
    logging_steps: int = typer.Option(None, "--logging-steps", help="Record the loss every N steps [default: 1]."),
    seed: int = typer.Option(None, "--seed", help="Seed of the weights' init, dropout and the data order "
                                                  "[default: 42]."),
    save_strategy: str = typer.Option(None, "--save-strategy", help="steps | epoch | no [default: steps]."),
    save_steps: int = typer.Option(None, "--save-steps", help="Save a checkpoint every N steps (and at the end) "
                                                              "[default: 500]."),
    save_total_limit: int = typer.Option(None, "--save-total-limit", help="Keep only the last N checkpoints "
                                                                          "[default: all]."),
    max_samples: int = typer.Option(None, "--max-samples", help="Train on the dataset's first N samples only "
                                                                "(LLaMA-Factory max_samples) [default: all]."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the output directory's last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run in the output directory "
                                                              "(its checkpoints and record; nothing else)."),
    random_init: bool = typer.Option(False, "--random-init", help="Random weights from the model's config instead "
                                                                  "of loading them."),
    smoke_test: bool = typer.Option(False, "--smoke-test", help="A few steps of the same pipeline with a tiny model "
                                                                "of the model's family."),
    auto_retry: bool = typer.Option(False, "--auto-retry", help="After a CUDA out-of-memory error, retry with the "
                                                                "next plan (half the micro-batch, same global batch)."),
    no_probe: bool = typer.Option(False, "--no-probe", help="Skip the step on the heaviest micro-batch that runs "
                                                            "before training (it makes an out-of-memory error "
                                                            "surface at step 0)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the command, environment and generated configs; "
                                                          "run nothing."),
    launcher: str = typer.Option(None, "--launcher", help="torchrun | deepspeed | accelerate (more than one GPU or "
                                                          "node) [default: torchrun]."),
    node_rank: int = typer.Option(None, "--node-rank", help="This node's rank (multi-node) [default: 0]."),
    master_addr: str = typer.Option(None, "--master-addr", help="Rank 0's address (multi-node) "
                                                                "[default: 127.0.0.1]."),
    master_port: int = typer.Option(None, "--master-port", help="Rank 0's port (default: a free port on one node, "
                                                                "29500 across nodes)."),
    json_: bool = typer.Option(False, "--json", help="Print the run record (or with --dry-run the launch) as JSON."),
):
    """Fine-tune with the planned settings: transformers Trainer, peft, DeepSpeed, torchrun.

    Loads the model directory (or --random-init weights), its processor and chat template, and the LLaMA-Factory
    dataset (--dataset; images pre-resized to --image-max-pixels, labels on assistant turns, samples over the cutoff
    dropped), prepares the model as `vlplan estimate` models it, and trains with the setup's micro-batch,
    accumulation, precision, optimizer, attention and ZeRO stage. With --from-llamafactory the YAML's
    model_name_or_path, dataset/dataset_dir, output_dir, learning rate, steps or epochs, scheduler, warmup, save,
    logging and seed keys apply too; flags typed on the command line win. Writes OUTPUT_DIR/vlplan_run.json (plan,
    estimate, settings, per-step losses, measured CUDA peaks). Before the first step it trains one step on the
    heaviest micro-batch of the data and puts the model, optimizer and random state back, so an out-of-memory error
    surfaces at step 0 (the record's "probe": its samples and measured peak; --no-probe skips it). Exit codes: 0 done, 2 bad input, 3 out of memory,
    128 + signal when interrupted (a checkpoint is saved; continue with --resume).
    """
    from vlplan import run
    from vlplan.runner.job import RunOptions, load_plan, setup_from_settings

    # the shared file flags (--dataset, --dataset-dir, --media-dir, --dataset-info) as typed or filled from the YAML
    params = {**ctx.params, **ctx.meta.get("dataset_flags", {})}
    yaml_options, yaml_warnings = ctx.meta.get("llamafactory_run", ({}, []))
    for warning in yaml_warnings:
        typer.echo(f"warning: {warning}", err=True)
    typed = dict(output_dir=_str(output_dir), max_steps=max_steps, epochs=epochs, learning_rate=learning_rate,
                 lr_scheduler_type=lr_scheduler_type, warmup_ratio=warmup_ratio, warmup_steps=warmup_steps,
                 logging_steps=logging_steps, seed=seed, save_strategy=save_strategy, save_steps=save_steps,
                 save_total_limit=save_total_limit, max_samples=max_samples, launcher=launcher, node_rank=node_rank,
                 master_addr=master_addr, master_port=master_port,
                 dataset=_str(params.get("dataset")),
                 dataset_dir=_str(params.get("dataset_dir")), media_dir=_str(params.get("media_dir")),
                 dataset_info=_str(params.get("dataset_info")), model=_str(params.get("model")))
    with errors():
        # the library's defaults (RunOptions) < the YAML < flags typed on the command line
        chosen = {**yaml_options, **{key: value for key, value in typed.items() if value is not None}}
        if chosen.get("dataset") is None:
            raise VlplanError("--dataset is required: a LLaMA-Factory dataset file (JSON/JSONL), or a name in "
                              "--dataset-info (or dataset: in the --from-llamafactory YAML)")
        if chosen.get("model") is None:
            raise VlplanError("--model is required: a local model directory (or a registry name with "
                              "--random-init), or model_name_or_path in the --from-llamafactory YAML")
        if chosen.get("output_dir") is None:
            raise VlplanError("--output-dir is required (or output_dir in the --from-llamafactory YAML)")
        if max_steps is not None or epochs is not None:  # a typed length replaces the YAML's, whichever it is
            for key in ("max_steps", "epochs"):
                if typed[key] is None:
                    chosen.pop(key, None)
        plan_dict = None
        if plan_file is not None and global_batch_size is not None:
            raise VlplanError("--plan already fixes the batch settings; drop --global-batch-size or --plan")
        if plan_file is not None:
            plan_dict = load_plan(plan_file)
            setup = setup_from_settings(plan_dict["settings"], setup.model, f"--plan {plan_file}")
        elif global_batch_size is not None:
            from vlplan import plan
            from vlplan.planner.hardware import host_ram_budget

            # the run trains on this machine's nodes: plan offload within their RAM when this machine is the planned
            # one, else within the GPU type's stated assumption (as `vlplan plan` does)
            host_ram, source = host_ram_budget(setup, None)
            planned = plan(setup, global_batch_size=global_batch_size, host_ram_bytes=host_ram,
                           host_ram_source=source)
            plan_dict, setup = planned.to_dict(), planned.setup
        scan = getattr(resolved, "scan", None)
        options = RunOptions(cutoff_len=scan.cutoff_len if scan is not None else None, resume=resume,
                             overwrite=overwrite, random_init=random_init, smoke_test=smoke_test,
                             auto_retry=auto_retry, probe=not no_probe, plan=plan_dict, **chosen)
        result, code = run(setup, options, dry_run=dry_run, on_event=render_event)
    if json_:
        print_json(result)
    elif dry_run:
        render_launch(result)
    else:
        render_record(result, options)
    if code:
        raise typer.Exit(code)


def _str(value) -> str | None:
    return None if value is None else str(value)


def render_event(kind: str, data: dict) -> None:
    """Progress of the run, on stderr (stdout holds the result: the summary, or the JSON with --json); the same lines
    as its launched ranks (runner/worker.py)."""
    from vlplan.runner.worker import print_event

    print_event(kind, data)


def render_launch(launch: dict) -> None:
    print(f"launcher: {launch['launcher']}, {launch['processes_per_node']} process(es) per node x {launch['nodes']} "
          "node(s)")
    for note in launch["notes"]:
        print(f"note: {note}")
    print("environment:")
    for key, value in launch["env"].items():
        print(f"  {key}={value}")
    print("command (in that environment):")
    print(f"  {shlex.join(launch['command'])}")
    for name, config in launch["configs"].items():
        print(f"{name} config:")
        print(json.dumps(config, indent=2))


def render_record(record: dict, options) -> None:
    if not record:
        return
    losses = record.get("losses") or []
    trend = f"; loss {losses[0]['loss']:.4f} -> {losses[-1]['loss']:.4f}" if losses else ""
    status = record.get("status")
    print(f"{status}: {record.get('steps', 0)} steps{trend}; record {Path(options.output_dir) / 'vlplan_run.json'}")
    if status == "completed":
        print(f"trained weights and processor saved to {options.output_dir}")
    probe = record.get("probe") or {}
    if probe.get("status") == "done":
        peak = probe.get("max_memory_allocated_bytes") or probe.get("live_tensor_peak_bytes")
        estimated = probe.get("estimate_allocated_peak_bytes")
        print(f"heaviest micro-batch probed first: sample(s) {', '.join('#' + str(i) for i in probe['samples'])}, "
              f"peak {peak / 2**30:.3f} GiB allocated"
              + (f" (estimate {estimated / 2**30:.3f} GiB)" if estimated else ""))
    elif probe.get("skipped"):
        print(f"note: {probe['skipped']}", file=sys.stderr)
    if record.get("oom"):
        print(f"error: {record['oom']['message']}", file=sys.stderr)
    for warning in record.get("warnings") or []:
        print(f"warning: {warning}", file=sys.stderr)
