"""The model/method/precision/data/parallelism flags shared by estimate, trace, plan and profile.

Declared once (`SETUP_OPTIONS`) and attached to each command by `@setup_command`, which turns them into the one
`TrainSetup` the command receives. Defaults follow LLaMA-Factory's.
"""

from __future__ import annotations

import functools
import inspect

import typer

from vlplan.planner.errors import VlplanError

K = inspect.Parameter.KEYWORD_ONLY


def _opt(name: str, default, annotation, *flags: str, help: str):
    return inspect.Parameter(name, K, default=typer.Option(default, *flags, help=help, show_default=True),
                             annotation=annotation)


SETUP_OPTIONS = [
    _opt("model", ..., str, "--model", "-m",
         help="Registry name (see `vlplan models`), hub id, or a local config.json / model directory."),
    _opt("method", "lora", str, "--method", help="full | freeze | lora | qlora."),
    _opt("lora_rank", 8, int, "--lora-rank", help="LoRA rank."),
    _opt("lora_alpha", None, int | None, "--lora-alpha", help="LoRA alpha (default: 2 x rank, as LLaMA-Factory)."),
    _opt("lora_target", "all", str, "--lora-target",
         help="all, or comma-separated linear names (q_proj,v_proj,...). all = every linear of the LoRA-trained "
              "components except lm_head and the projector."),
    _opt("dora", False, bool, "--dora", help="DoRA instead of LoRA."),
    _opt("train_vision", False, bool, "--train-vision/--freeze-vision",
         help="Train the vision tower (in full for full/freeze, with LoRA for lora/qlora). Frozen by default."),
    _opt("train_projector", False, bool, "--train-projector/--freeze-projector",
         help="Train the projector in full. Frozen by default."),
    _opt("freeze_llm", False, bool, "--freeze-llm", help="Freeze the language model."),
    _opt("freeze_trainable_layers", 2, int, "--freeze-trainable-layers",
         help="--method freeze: how many last language-model layers train."),
    _opt("precision", "bf16", str, "--precision",
         help="bf16 (AMP, fp32 trainable weights; LLaMA-Factory's default) | fp16 | fp32 | pure-bf16."),
    _opt("quant_bits", None, int | None, "--quant-bits", help="QLoRA weight bits: 4 (default for qlora) or 8."),
    _opt("optimizer", "adamw", str, "--optimizer",
         help="adamw (torch fused, HF default) | adamw-foreach | adamw-8bit | paged-adamw-8bit | sgd | adafactor."),
    _opt("seq_len", 2048, int, "--seq-len", help="Tokens per sample (LLaMA-Factory cutoff_len), image tokens included."),
    _opt("batch_size", 1, int, "--batch-size", help="Micro-batch per GPU."),
    _opt("gradient_accumulation_steps", 1, int, "--gradient-accumulation-steps", help="Gradient accumulation."),
    _opt("images", 1, int, "--images", help="Images per sample."),
    _opt("image_size", None, list[str] | None, "--image-size",
         help="Image WxH (repeat for different sizes per image; default: a square at --image-max-pixels)."),
    _opt("image_max_pixels", 768 * 768, int, "--image-max-pixels",
         help="LLaMA-Factory pre-resize cap (image_max_pixels)."),
    _opt("image_min_pixels", 32 * 32, int, "--image-min-pixels", help="LLaMA-Factory pre-resize floor."),
    _opt("attn", "sdpa", str, "--attn", help="sdpa | fa2 | eager."),
    _opt("gradient_checkpointing", True, bool, "--gradient-checkpointing/--no-gradient-checkpointing",
         help="Activation checkpointing (on by default, as LLaMA-Factory)."),
    _opt("gpu", "h100-80g", str, "--gpu", help="GPU id (see `vlplan gpus`)."),
    _opt("gpu_memory_gib", None, float | None, "--gpu-memory-gib", help="Any other GPU: its memory in GiB."),
    _opt("num_gpus", 1, int, "--num-gpus", help="GPUs per node."),
    _opt("num_nodes", 1, int, "--num-nodes", help="Nodes."),
    _opt("zero", 0, int, "--zero", help="DeepSpeed ZeRO stage 0-3 (0: plain DDP)."),
    _opt("offload", "none", str, "--offload", help="none | optimizer | all (DeepSpeed CPU offload)."),
]
SETUP_OPTION_NAMES = [p.name for p in SETUP_OPTIONS]


def setup_from_options(**options):
    """The TrainSetup of the shared flags (library call; errors are VlplanError)."""
    from vlplan.planner.hardware import custom_gpu, find_gpu
    from vlplan.planner.registry import resolve
    from vlplan.planner.setup import make_setup
    from vlplan.planner.tokens import parse_size

    gpu = custom_gpu(options["gpu_memory_gib"]) if options["gpu_memory_gib"] else find_gpu(options["gpu"])
    sizes = [parse_size(s) for s in options["image_size"] or []]
    images = None
    if len(sizes) > 1:
        if options["images"] not in (1, len(sizes)):
            raise VlplanError(f"--images {options['images']} contradicts {len(sizes)} --image-size values; give one "
                              "--image-size per image or one size with --images N")
        images = sizes
    return make_setup(
        resolve(options["model"]), method=options["method"], train_vision=options["train_vision"],
        train_projector=options["train_projector"], freeze_llm=options["freeze_llm"],
        lora_rank=options["lora_rank"], lora_alpha=options["lora_alpha"], lora_target=options["lora_target"],
        dora=options["dora"], quant_bits=options["quant_bits"], num_images=options["images"],
        image_size=sizes[0] if len(sizes) == 1 else None, images=images, gpu=gpu,
        freeze_trainable_layers=options["freeze_trainable_layers"], precision=options["precision"],
        optimizer=options["optimizer"], seq_len=options["seq_len"], batch_size=options["batch_size"],
        gradient_accumulation_steps=options["gradient_accumulation_steps"],
        image_max_pixels=options["image_max_pixels"], image_min_pixels=options["image_min_pixels"],
        attn=options["attn"], gradient_checkpointing=options["gradient_checkpointing"],
        num_gpus=options["num_gpus"], num_nodes=options["num_nodes"], zero=options["zero"],
        offload=options["offload"])


def setup_command(fn):
    """Give `fn(setup, ...)` the shared flags; it receives the resolved TrainSetup as `setup`."""
    signature = inspect.signature(fn)
    own = [p for p in signature.parameters.values() if p.name != "setup"]

    @functools.wraps(fn)
    def wrapper(**kwargs):
        options = {name: kwargs.pop(name) for name in SETUP_OPTION_NAMES}
        with errors():
            setup = setup_from_options(**options)
        return fn(setup=setup, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=own + SETUP_OPTIONS)
    return wrapper


class errors:
    """Turn VlplanError into `error: <message>` on stderr and exit code 2 (no traceback)."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, VlplanError):
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        return False
