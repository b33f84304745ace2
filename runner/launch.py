"""Where a run's processes come from: this process, or torchrun / the DeepSpeed launcher / accelerate.

One GPU (or the CPU) trains in this process. More GPUs or nodes start `python -m vlplan.runner.worker` once per GPU
under a launcher, each handed the same job (`VLPLAN_JOB`, JSON: the resolved settings and run options), so every
rank trains exactly the setup this process resolved. The launch environment follows LLaMA-Factory's torchrun path
(src/llamafactory/launcher.py, OPTIM_TORCH): expandable CUDA segments and no NCCL record-streams. Without CUDA the
ranks are CPU processes talking over gloo (the distributed path, testable on a laptop).

`run` also owns the run's safety around the processes: the output-directory check, the smoke test's tiny model,
and `--auto-retry` after an out-of-memory error (the next setup keeps the global batch).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

from vlplan.planner.errors import VlplanError
from vlplan.planner.io.files import write_json_atomic
from vlplan.planner.oom import OOM_EXIT_CODE, next_setup
from vlplan.planner.setup import TrainSetup

from .job import JOB_ENV, SMOKE_TEST_STEPS, RunOptions, job_json
from .record import (OOM_REPORT_NAME, RECORD_NAME, STATE_DIR, TINY_MODEL_DIR, check_resume, last_checkpoint,
                     prepare_output_dir, read_record)
from .train import Interrupted, RunOutOfMemory, train

WORKER_MODULE = "vlplan.runner.worker"  # runner/worker.py: one rank of a launch
# LLaMA-Factory launcher.py (OPTIM_TORCH, on by default since v0.9.3) sets these on its torchrun path
CUDA_LAUNCH_ENV = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "TORCH_NCCL_AVOID_RECORD_STREAMS": "1"}
DEFAULT_MASTER_PORT = 29500  # torchrun's default


@dataclass
class Launch:
    """How the run starts: the command, the variables set on top of the caller's environment, generated configs."""

    command: list[str]
    env: dict[str, str]
    processes_per_node: int
    nodes: int
    launcher: str  # "none" (this process), torchrun, deepspeed or accelerate
    configs: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def shell(self) -> str:
        variables = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return f"{variables} {shlex.join(self.command)}".strip()

    def to_dict(self) -> dict:
        return {"command": self.command, "shell": self.shell(), "env": self.env,
                "processes_per_node": self.processes_per_node, "nodes": self.nodes, "launcher": self.launcher,
                "configs": self.configs, "notes": self.notes}


def cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def free_port() -> int:
    """A TCP port free on this host now (LLaMA-Factory find_available_port)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _executable(name: str, module: str) -> list[str]:
    """A launcher's console script beside this Python (the venv's), else `python -m module`."""
    script = Path(sys.executable).with_name(name)
    return [str(script)] if script.is_file() else [sys.executable, "-m", module]


def launch_for(setup: TrainSetup, options: RunOptions, *, devices: int | None = None) -> Launch:
    """The command, environment and configs that start `setup` (a dry run prints exactly this)."""
    devices = cuda_devices() if devices is None else devices
    env = {JOB_ENV: job_json(setup, options)}
    configs = {}
    notes = []
    if setup.zero > 0:
        configs["deepspeed"] = filled_deepspeed_config(setup, options)
        notes.append("the DeepSpeed config as the HF Trainer fills its \"auto\" values from the training arguments")
    gpus, nodes = setup.num_gpus, setup.num_nodes
    if setup.world_size == 1:
        return Launch([sys.executable, "-m", WORKER_MODULE], env, 1, 1, "none", configs, notes)
    if devices:
        env.update(CUDA_LAUNCH_ENV)
    else:
        notes.append(f"no CUDA device: {gpus} CPU processes per node over gloo")
    port = str(options.master_port or (free_port() if nodes == 1 else DEFAULT_MASTER_PORT))
    if setup.sharding == "fsdp":  # accelerate with the plan's FSDP config (runner/fsdp_launch.py)
        from .fsdp_launch import accelerate_config_path, fsdp_command, fsdp_config

        configs["accelerate"] = fsdp_config(setup, bool(devices))
        notes.append(f"the accelerate config is written to {accelerate_config_path(options.output_path)}")
        command = fsdp_command(setup, options.output_path, node_rank=options.node_rank,
                               master_addr=options.master_addr, port=port, worker_module=WORKER_MODULE)
        return Launch(command, env, gpus, nodes, "accelerate", configs, notes)
    if options.launcher == "torchrun":
        command = _executable("torchrun", "torch.distributed.run") + [
            "--nnodes", str(nodes), "--node_rank", str(options.node_rank), "--nproc_per_node", str(gpus),
            "--master_addr", options.master_addr, "--master_port", port, "-m", WORKER_MODULE]
    elif options.launcher == "deepspeed":
        command = _executable("deepspeed", "deepspeed.launcher.runner") + [
            "--num_nodes", str(nodes), "--num_gpus", str(gpus), "--master_addr", options.master_addr,
            "--master_port", port]
        if nodes > 1:
            # one launcher per node (no pdsh/ssh from a hostfile), like torchrun
            command += ["--no_ssh", "--node_rank", str(options.node_rank)]
        command += ["--no_local_rank", "--module", WORKER_MODULE]  # the rank comes from the environment
    else:
        command = _executable("accelerate", "accelerate.commands.launch") + (["launch"] if Path(
            sys.executable).with_name("accelerate").is_file() else []) + [
            "--multi_gpu" if devices else "--cpu", "--num_processes", str(gpus * nodes), "--num_machines",
            str(nodes), "--machine_rank", str(options.node_rank), "--main_process_ip", options.master_addr,
            "--main_process_port", port, "-m", WORKER_MODULE]
    return Launch(command, env, gpus, nodes, options.launcher, configs, notes)


# Fields of TrainingArguments that HfTrainerDeepSpeedConfig.trainer_config_process reads
_DS_ARGUMENT_FIELDS = ("per_device_train_batch_size", "gradient_accumulation_steps", "max_grad_norm", "learning_rate",
                       "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "save_on_each_node", "fp16",
                       "fp16_full_eval", "bf16", "bf16_full_eval")


def filled_deepspeed_config(setup: TrainSetup, options: RunOptions) -> dict:
    """The setup's DeepSpeed config (planner.io.deepspeed) with its "auto" values filled by transformers' own
    HfTrainerDeepSpeedConfig, as the Trainer of the launched ranks fills it."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from vlplan.planner.io.deepspeed import deepspeed_config

    from .train import training_arguments

    # the values one rank's TrainingArguments hold (built here for a single process; the world size is the setup's)
    args = training_arguments(replace(setup, zero=0, offload="none", num_gpus=1, num_nodes=1), options)
    view = SimpleNamespace(**{name: getattr(args, name) for name in _DS_ARGUMENT_FIELDS},
                           world_size=setup.world_size, get_warmup_steps=args.get_warmup_steps)
    hf = HfTrainerDeepSpeedConfig(deepspeed_config(setup))
    hf.trainer_config_process(view)
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=setup.model.text.hidden_size))
    hf.trainer_config_finalize(view, model, options.max_steps or 0)
    return hf.config


# The run ------------------------------------------------------------------------------------------------------------
def smoke_test_setup(setup: TrainSetup, cuda: bool) -> tuple[TrainSetup, list[str]]:
    """The setup of a smoke test: the same, except that on a machine without CUDA what needs CUDA is swapped for
    its CPU equivalent (each swap noted). The model is swapped for the tiny one by `smoke_test_model`."""
    from .tiny import tiny_family_for

    family = tiny_family_for(setup.model)
    changes: dict = {}
    notes = [f"smoke test: a tiny {family} model, {SMOKE_TEST_STEPS} steps unless --max-steps"]
    if not cuda:
        if setup.attn == "fa2":
            changes["attn"] = "sdpa"
            notes.append("no CUDA: FlashAttention-2 -> sdpa")
        if setup.sharding == "fsdp":
            # accelerate sets DistributedType.FSDP for GPU backends only (state.py): on the CPU it would run DDP
            changes.update(sharding="zero", fsdp="full_shard", zero=0, offload="none")
            notes.append("no CUDA: FSDP -> plain data parallel (accelerate runs FSDP on GPUs only)")
        elif setup.zero or setup.offload != "none":
            changes.update(zero=0, offload="none")
            notes.append("no CUDA: DeepSpeed ZeRO -> plain data parallel (DeepSpeed needs CUDA)")
        if setup.method == "qlora":
            changes.update(method="lora", quant_bits=None)
            notes.append("no CUDA: QLoRA -> LoRA (bitsandbytes needs CUDA)")
        if setup.precision == "fp16":
            changes["precision"] = "bf16"
            notes.append("no CUDA: fp16 AMP -> bf16 AMP (no fp16 autocast on the CPU)")
        if setup.num_nodes > 1:
            changes["num_nodes"] = 1
            notes.append("no CUDA: one node")
    return replace(setup, **changes), notes


def smoke_test_model(setup: TrainSetup, options: RunOptions) -> tuple[TrainSetup, RunOptions]:
    """The tiny model of the setup's family, written into the output directory (kept for --resume and for loading
    the trained adapter), in place of the setup's model."""
    from vlplan.planner.registry import resolve

    from .tiny import tiny_family_for, write_tiny_model

    tiny_dir = options.output_path / TINY_MODEL_DIR
    if not (tiny_dir / "config.json").is_file():
        write_tiny_model(tiny_family_for(setup.model), tiny_dir)
    setup = replace(setup, model=resolve(str(tiny_dir)))
    options = replace(options, model=str(tiny_dir), random_init=False,
                      max_steps=options.max_steps or SMOKE_TEST_STEPS)
    return setup, options


def run(setup: TrainSetup, options: RunOptions, *, dry_run: bool = False,
        on_event=lambda kind, data: None) -> tuple[dict, int]:
    """Run (or with `dry_run` describe) the fine-tune; returns (record or launch description, exit code).

    Exit codes: 0 completed, 128 + signal number when interrupted, OOM_EXIT_CODE after an out-of-memory error.
    """
    from . import name_cpu_accelerator

    name_cpu_accelerator()
    options.check(setup)
    devices = cuda_devices()
    if dry_run:
        if options.smoke_test:
            raise VlplanError("--smoke-test writes a tiny model into the output directory; run it without --dry-run")
        launch = launch_for(setup, options, devices=devices or setup.num_gpus)
        if not devices:
            launch.notes.append(f"this machine has no CUDA device: the launch shown is the one on a node with "
                                f"{setup.num_gpus} GPU(s)")
        return launch.to_dict(), 0
    if options.smoke_test:
        if _inside_launch():
            raise VlplanError("--smoke-test starts its own processes; run it without torchrun")
        setup, notes = smoke_test_setup(setup, cuda=devices > 0)
    _check_devices(setup, devices)
    check_requirements(setup, devices)
    if not options.smoke_test:  # the smoke test's model is written below, into the output directory
        check_resume(setup.describe(), options)
    check_dataset(options)
    if _inside_launch():
        if int(os.environ["WORLD_SIZE"]) != setup.world_size:
            raise VlplanError(f"this launch has {os.environ['WORLD_SIZE']} processes but the setup has "
                              f"{setup.world_size} ranks (--num-gpus x --num-nodes); make them agree")
        if os.environ.get("RANK", "0") == "0":
            prepare_output_dir(options)
    else:
        prepare_output_dir(options)
    if options.smoke_test:
        setup, options = smoke_test_model(setup, options)
        check_resume(setup.describe(), options)
        for note in notes:
            on_event("note", {"message": note})
    retries: list[dict] = []
    while True:
        record, code = _attempt(setup, options, devices, on_event)
        report = record.get("oom") if record else None
        if code != OOM_EXIT_CODE or not options.auto_retry:
            break
        follow, why = next_setup(setup)
        if follow is None:
            break
        retries.append({"from": setup.describe(), "to": follow.describe(), "change": why, "oom": report})
        on_event("retry", {"change": why, "message": report["message"] if report else ""})
        setup = follow
        options = replace(options, resume=last_checkpoint(options.output_path) is not None, overwrite=False)
    if retries:
        record = dict(record or {}, retries=retries)
        write_json_atomic(options.output_path / RECORD_NAME, record)
    return record, code


def _check_devices(setup: TrainSetup, devices: int) -> None:
    if devices and setup.num_gpus > devices:
        raise VlplanError(f"--num-gpus {setup.num_gpus} but this node has {devices} CUDA devices; pass --num-gpus "
                          f"{devices} or fewer")
    if not devices and setup.sharding == "fsdp":
        raise VlplanError("accelerate runs FSDP on CUDA GPUs only (on the CPU it falls back to plain data parallel) "
                          "and this machine has none; use --dry-run to see the launch, or --smoke-test to try the "
                          "pipeline on the CPU")
    if not devices and setup.sharding == "zero" and (setup.zero or setup.offload != "none"):
        raise VlplanError("DeepSpeed ZeRO needs CUDA GPUs and this machine has none; use --dry-run to see the "
                          "launch, or --smoke-test to try the pipeline on the CPU")


def check_requirements(setup: TrainSetup, devices: int) -> None:
    """The packages and the CUDA the setup's kernels need, checked before anything is written."""
    from importlib.util import find_spec

    if setup.attn == "fa2":
        if not devices:
            raise VlplanError("--attn fa2 (FlashAttention-2) needs a CUDA GPU and this machine has none; use "
                              "--attn sdpa")
        if find_spec("flash_attn") is None:
            raise VlplanError("--attn fa2 needs the flash-attn package (pip install flash-attn "
                              "--no-build-isolation); or use --attn sdpa")
    needs_bnb = [what for what, needed in (("--method qlora", setup.method == "qlora"),
                                           (f"--optimizer {setup.optimizer}", setup.optimizer.endswith("8bit")))
                 if needed]
    if needs_bnb and find_spec("bitsandbytes") is None:
        raise VlplanError(f"{' and '.join(needs_bnb)} needs the bitsandbytes package (pip install bitsandbytes); or "
                          "use --optimizer adamw" + (" and --method lora" if setup.method == "qlora" else ""))
    if setup.method == "qlora" and not devices:
        raise VlplanError("QLoRA quantizes with bitsandbytes, which needs a CUDA GPU; use --method lora on this "
                          "machine")


def check_dataset(options: RunOptions) -> None:
    """Read the dataset and every image header before anything is written: a malformed file, a missing image or
    one Pillow refuses to open (its decompression-bomb limit, which LLaMA-Factory's loader meets too) is a one-line
    error here instead of a traceback after the output directory exists."""
    from PIL import Image

    from vlplan.planner.dataset import read_dataset
    from vlplan.planner.image_header import ImageError, image_size

    samples = read_dataset(options.dataset, dataset_dir=options.dataset_dir, media_dir=options.media_dir,
                           dataset_info=options.dataset_info)
    if not samples:
        raise VlplanError(f"dataset {options.dataset} holds no sample")
    # PIL.Image._decompression_bomb_check: more than twice MAX_IMAGE_PIXELS raises DecompressionBombError
    limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    for sample in samples[:options.max_samples]:
        for path, ref in zip(sample.images, sample.image_refs or sample.images):
            try:
                width, height = image_size(path)
            except ImageError as err:
                raise VlplanError(f"sample {sample.index}: cannot read image {ref} ({err})") from None
            if limit and width * height > limit:
                raise VlplanError(f"sample {sample.index}: image {ref} is {width}x{height} ({width * height:,} "
                                  f"pixels), over Pillow's decompression-bomb limit of {limit:,} pixels, so neither "
                                  "vlplan run nor LLaMA-Factory can open it; resize it")


def _attempt(setup: TrainSetup, options: RunOptions, devices: int, on_event) -> tuple[dict | None, int]:
    report_path = options.output_path / STATE_DIR / OOM_REPORT_NAME
    if report_path.exists():
        report_path.unlink()  # from an earlier attempt
    if setup.world_size == 1 or _inside_launch():
        try:
            record = train(setup, options, on_event)
        except Interrupted as err:
            on_event("note", {"message": f"interrupted by {err} before training started; nothing to save"})
            return read_record(options.output_path), 128 + err.signum
        except RunOutOfMemory:
            return read_record(options.output_path), OOM_EXIT_CODE
        return record, _exit_code(record)
    launch = launch_for(setup, options, devices=devices)
    if setup.sharding == "fsdp":
        from .fsdp_launch import write_fsdp_config

        write_fsdp_config(setup, options.output_path, devices > 0)
    on_event("launch", launch.to_dict())
    record_path = options.output_path / RECORD_NAME
    before = record_path.stat().st_mtime_ns if record_path.exists() else None
    code, forwarded = _launch(launch)
    if report_path.exists():
        record = dict(read_record(options.output_path) or {}, status="oom", oom=json.loads(report_path.read_text()))
        write_json_atomic(record_path, record)
        return record, OOM_EXIT_CODE
    record = read_record(options.output_path)
    written = record is not None and record_path.stat().st_mtime_ns != before
    if written and record.get("status") == "failed":
        raise VlplanError(f"the run failed: {record.get('error')} (the output of the launched processes above has "
                          "the details)")
    if not written or record.get("status") == "running":
        if forwarded:
            on_event("note", {"message": f"interrupted by {signal.Signals(forwarded).name} before a checkpoint; "
                                         "nothing to save"})
            return (record if written else None), 128 + forwarded
        raise VlplanError(f"the launched processes stopped (exit code {code}) before finishing the run; their "
                          "output above says why")
    return record, _exit_code(record)


def _exit_code(record: dict) -> int:
    if record.get("status") == "interrupted":
        return 128 + int(signal.Signals[record.get("signal", "SIGTERM")])
    return 0


def _inside_launch() -> bool:
    """This process is already one rank of a launch (a user's own torchrun)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _launch(launch: Launch) -> tuple[int, int | None]:
    """Start the launcher and wait. SIGINT/SIGTERM go to the ranks themselves, which finish the step, save a
    checkpoint and stop: the launcher runs in its own session (a terminal's Ctrl-C reaches only this process), since
    torchrun answers a signal by killing its ranks 30 s later, which a large checkpoint may not survive.
    Returns the launcher's exit code and the signal passed on, if any."""
    import psutil  # an accelerate dependency

    process = subprocess.Popen(launch.command, env={**os.environ, **launch.env}, start_new_session=True)
    forwarded: list[int] = []

    def forward(signum, frame):
        forwarded.append(signum)
        try:
            ranks = [p for p in psutil.Process(process.pid).children(recursive=True)
                     if WORKER_MODULE in " ".join(p.cmdline())]
        except psutil.Error:
            ranks = []
        for rank in ranks:
            try:
                rank.send_signal(signum)
            except psutil.Error:
                pass
        if not ranks:  # not started yet (or gone): the launcher stops them
            process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return process.wait(), (forwarded[0] if forwarded else None)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def worker_main(on_event) -> int:
    """A launched rank: train the job of VLPLAN_JOB; the exit code tells the launcher how it ended."""
    from . import name_cpu_accelerator
    from .job import job_from_json

    name_cpu_accelerator()
    setup, options = job_from_json(os.environ[JOB_ENV])
    try:
        record = train(setup, options, on_event)
    except Interrupted as err:
        return 128 + err.signum
    except RunOutOfMemory:
        return OOM_EXIT_CODE
    return _exit_code(record)

