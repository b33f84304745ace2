"""Launching an FSDP setup: `accelerate launch --config_file <output>/accelerate_fsdp2.yaml -m <the worker module>`.

The config is planner/io/accelerate.py's (FSDP version 2, the plan's strategy, offload and mesh), the file LLaMA-Factory
users pass to `accelerate launch` too. accelerate exports it to each rank as FSDP_* variables; the HF Trainer's
accelerator builds its FSDP plugin from them and `fsdp2_prepare_model` wraps the model vlplan built. Without CUDA the
ranks run on the CPU over gloo (FSDP2 shards on any device; accelerate picks gloo when there is no GPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

from vlplan.planner.io.accelerate import accelerate_config, dump_accelerate_config
from vlplan.planner.setup import TrainSetup

ACCELERATE_CONFIG_NAME = "accelerate_fsdp2.yaml"


def accelerate_config_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / ACCELERATE_CONFIG_NAME


def fsdp_command(setup: TrainSetup, output_dir: str | Path, *, node_rank: int, master_addr: str, port: str,
                 worker_module: str) -> list[str]:
    """The accelerate command of every node (`--machine_rank` differs); the config file holds the rest."""
    script = Path(sys.executable).with_name("accelerate")
    launcher = [str(script), "launch"] if script.is_file() else [sys.executable, "-m", "accelerate.commands.launch"]
    return launcher + ["--config_file", str(accelerate_config_path(output_dir)), "--machine_rank", str(node_rank),
                       "--main_process_ip", master_addr, "--main_process_port", port, "-m", worker_module]


def fsdp_config(setup: TrainSetup, cuda: bool) -> dict:
    """The accelerate config the launch writes; without CUDA the ranks run on the CPU (gloo) in fp32 or bf16."""
    config = accelerate_config(setup)
    if not cuda:
        config["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] = False  # every rank builds its own random model
    return config


def write_fsdp_config(setup: TrainSetup, output_dir: str | Path, cuda: bool) -> Path:
    import yaml

    path = accelerate_config_path(output_dir)
    path.write_text(yaml.safe_dump(fsdp_config(setup, cuda), sort_keys=False) if not cuda
                    else dump_accelerate_config(setup))
    return path
