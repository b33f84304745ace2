"""HF `TrainingArguments` for a TrainSetup, as a JSON-ready dict (`TrainingArguments(**training_arguments(setup))`).

The keys are the ones LLaMA-Factory passes through to the HF Trainer for the same setup (shared/reference/
llamafactory.md section 1a): precision flags, `optim`, batch and accumulation, clipping, checkpointing with
LLaMA-Factory's reentrant default (`use_reentrant_gc: true`), the DeepSpeed config path, and `remove_unused_columns:
false` (vision inputs are extra columns). What TrainingArguments cannot say (which components train, LoRA, QLoRA,
image limits, pure bf16 weights) belongs to the model preparation (profiler/build.py), not here.
`tests/test_plan_export.py` constructs transformers' TrainingArguments from the result.
"""

from __future__ import annotations

from ..errors import VlplanError
from ..setup import HF_OPTIM, TrainSetup
from .llamafactory import default_deepspeed_name


def training_arguments(setup: TrainSetup, *, output_dir: str = "saves/vlplan", deepspeed_path: str | None = None,
                       extra: dict | None = None) -> dict:
    """TrainingArguments keyword arguments for `setup`; `deepspeed_path` names the DeepSpeed JSON when ZeRO is on."""
    if setup.precision == "pure-bf16":
        # the weights themselves are bf16 (loaded so, trainable parameters not upcast); no autocast on top
        bf16, fp16 = False, False
    else:
        bf16, fp16 = setup.precision == "bf16", setup.precision == "fp16"
    args: dict = {
        "output_dir": output_dir,
        "per_device_train_batch_size": setup.batch_size,
        "gradient_accumulation_steps": setup.gradient_accumulation_steps,
        "bf16": bf16,
        "fp16": fp16,
        "optim": HF_OPTIM[setup.optimizer],
        "max_grad_norm": setup.max_grad_norm,
        "gradient_checkpointing": setup.gradient_checkpointing,
        "remove_unused_columns": False,
        "report_to": "none",
    }
    if setup.gradient_checkpointing:
        args["gradient_checkpointing_kwargs"] = {"use_reentrant": True}
    if setup.world_size > 1 and setup.method in ("lora", "qlora"):
        args["ddp_find_unused_parameters"] = False  # LLaMA-Factory sets it for LoRA under DDP
    if setup.liger_kernel:
        args["use_liger_kernel"] = True
    if setup.sharding == "zero" and (setup.zero > 0 or setup.offload != "none"):
        args["deepspeed"] = deepspeed_path or default_deepspeed_name(setup)
    if extra:
        clash = sorted(set(extra) & set(args))
        if clash:
            raise VlplanError(f"extra TrainingArguments {', '.join(clash)} would override the setup's own values")
        args.update(extra)
    return args


def check_exportable(setup: TrainSetup) -> None:
    """TrainingArguments written for a plain HF Trainer (`--export-hf-args`) cannot say everything a setup can:
    refuse, in one line, what its Trainer would train differently. (`vlplan run` prepares the model itself and uses
    `training_arguments` only for the rest.)"""
    if setup.vision_gradient_checkpointing is not None \
            and setup.vision_gradient_checkpointing != setup.gradient_checkpointing:
        raise VlplanError("TrainingArguments has one gradient_checkpointing switch for the whole model; per-component "
                          "checkpointing (--vision-gradient-checkpointing) cannot be exported as HF arguments")
    if setup.offload_checkpoints:
        raise VlplanError("offloaded checkpointing is LLaMA-Factory's use_unsloth_gc; the HF Trainer has no such "
                          "argument: export with --export-llamafactory")

