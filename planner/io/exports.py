"""`vlplan plan`'s exports: a plan's setup written as the config files users train with (a LLaMA-Factory training
YAML, a DeepSpeed JSON, transformers TrainingArguments as JSON), all or none."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import VlplanError
from .deepspeed import deepspeed_config
from .files import check_output_file, write_files_atomic
from .hf_args import check_exportable, training_arguments
from .llamafactory import default_deepspeed_name, training_yaml


def yaml_epochs(base: dict | None) -> float:
    """The epochs a plan's GPU-hours and export assume: the input YAML's num_train_epochs when it is a positive
    number, else 1."""
    value = (base or {}).get("num_train_epochs")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return 1.0


def write_exports(setup, *, llamafactory: Path | None, deepspeed: Path | None, hf_args: Path | None,
                  version: str = "latest", overwrite: bool = False, base: dict | None = None,
                  epochs: float | None = None, accelerate: Path | None = None) -> tuple[list[Path], list[str]]:
    """Write the requested config files for `setup`, and return them with notes for the user (placeholders to fill,
    keys of the input YAML the plan removed). The YAML is a complete training file (`training_yaml`: every key of
    `base` the plan does not decide is kept). With ZeRO on, the YAML and the TrainingArguments point at the
    DeepSpeed JSON (`deepspeed` if given, else LLaMA-Factory's file name next to them, written too). Existing files
    are kept unless `overwrite`; all contents are built, and every file written to a temporary name, before any is
    put in place, so a failure leaves nothing behind."""
    files: dict[Path, str] = {}
    notes: list[str] = []
    for path, flag in ((llamafactory, "--export-llamafactory"), (deepspeed, "--export-deepspeed"),
                       (hf_args, "--export-hf-args"), (accelerate, "--export-accelerate")):
        if path is not None:
            check_output_file(path, flag)  # a folder, a read-only folder: one line before anything is built
    if hf_args is not None:
        check_exportable(setup)  # what TrainingArguments cannot say (per-component / offloaded checkpointing)
    uses_deepspeed = setup.sharding == "zero" and (setup.zero > 0 or setup.offload != "none")
    if accelerate is not None or (setup.sharding == "fsdp" and llamafactory is not None):
        from .accelerate import default_accelerate_name, dump_accelerate_config

        acc_path = accelerate or llamafactory.parent / default_accelerate_name(setup)
        files[acc_path] = dump_accelerate_config(setup)
        if llamafactory is not None:
            # LLaMA-Factory's FSDP launch (README "FSDP+QLoRA": accelerate launch --config_file ... src/train.py
            # train.yaml); from the installed package, llamafactory/launcher.py run as __main__ is that src/train.py
            # (run_exp() on the YAML; it is what its own torchrun path starts)
            notes.append(f"launch with: accelerate launch --config_file {acc_path} -m llamafactory.launcher "
                         f"{llamafactory}")
    if hf_args is not None and setup.sharding == "fsdp":
        notes.append(f"{hf_args}: the TrainingArguments carry no FSDP settings; launch with `accelerate launch "
                     "--config_file` and the plan's accelerate config (--export-accelerate), which sets FSDP for the "
                     "Trainer's accelerator")
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
    try:
        write_files_atomic(files)
    except OSError as err:
        raise VlplanError(f"cannot write {err.filename}: {err.strerror or err}") from None
    return list(files), notes
