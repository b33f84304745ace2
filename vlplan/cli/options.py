"""The model/method/precision/data/parallelism flags shared by estimate, trace, plan and profile.

Declared once (`SETUP_OPTIONS`) and attached to each command by `@setup_command`, which turns them into the one
`TrainSetup` the command receives. Defaults follow LLaMA-Factory's.

The setup can also come from files: `--from-llamafactory train.yaml` (a LLaMA-Factory training config),
`--deepspeed ds.json` (a DeepSpeed config) and `--dataset data.json` (the images and sequence length of the longest
sample, or of `--percentile`). Every setup flag parses to None when it is not typed; `vlplan.planner.resolve
.resolve_setup` (the library function) applies the defaults and the precedence: a typed flag wins whatever its value.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from pathlib import Path

import typer

from vlplan import resolve_setup
from vlplan.planner.errors import VlplanError
from vlplan.planner.resolve import FILE_OPTIONS, SETUP_DEFAULTS, ResolvedSetup

__all__ = ["FILE_OPTIONS", "SETUP_DEFAULTS", "SETUP_OPTIONS", "ResolvedSetup", "errors", "resolve_setup",
           "setup_command"]

K = inspect.Parameter.KEYWORD_ONLY


def _opt(name: str, annotation, *flags: str, help: str, panel: str | None = None):
    """A setup flag that parses to None when not typed; the library's default (`SETUP_DEFAULTS`), applied by
    `resolve_setup` after the config files, is shown in --help."""
    default = SETUP_DEFAULTS[name]
    if annotation is not None and not (isinstance(annotation, type(int | None)) and type(None) in annotation.__args__):
        annotation = annotation | None
    shown = True if default is None else ("on" if default is True else "off" if default is False else str(default))
    option = typer.Option(None, *flags, help=help, show_default=shown if default is not None else False,
                          rich_help_panel=panel)
    return inspect.Parameter(name, K, default=option, annotation=annotation)


FILES_PANEL = "Config files and data"


SETUP_OPTIONS = [
    _opt("model", str | None, "--model", "-m",
         help="Registry name (see `vlplan models`), hub id, or a local config.json / model directory. Required "
              "unless --from-llamafactory names one (model_name_or_path)."),
    _opt("method", str, "--method", help="full | freeze | lora | qlora | oft (orthogonal fine-tuning, peft OFT)."),
    _opt("lora_rank", int, "--lora-rank", help="LoRA rank."),
    _opt("lora_alpha", int | None, "--lora-alpha", help="LoRA alpha (default: 2 x rank, as LLaMA-Factory)."),
    _opt("lora_target", str, "--lora-target",
         help="all, or comma-separated linear names (q_proj,v_proj,...). all = every linear of the LoRA-trained "
              "components except lm_head and the projector."),
    _opt("lora_dropout", float, "--lora-dropout",
         help="LoRA dropout on each adapter's input (LLaMA-Factory lora_dropout; ms-swift's default is 0.05)."),
    _opt("dora", bool, "--dora", help="DoRA instead of LoRA."),
    _opt("oft_rank", int | None, "--oft-rank",
         help="--method oft: orthogonal blocks per adapted linear (LLaMA-Factory oft_rank; sets the block size to 0)."),
    _opt("oft_block_size", int | None, "--oft-block-size",
         help="--method oft: size of each orthogonal block (LLaMA-Factory oft_block_size; default 32 unless "
              "--oft-rank). The adapted linears are --lora-target's, as in LLaMA-Factory."),
    _opt("module_dropout", float | None, "--module-dropout",
         help="--method oft: LLaMA-Factory module_dropout (peft's OFT layer never applies it: no memory change)."),
    _opt("train_vision", bool, "--train-vision",
         help="Train the vision tower (in full for full/freeze, with LoRA for lora/qlora). Frozen by default."),
    _opt("freeze_vision", bool, "--freeze-vision", help="Keep the vision tower frozen (over a YAML)."),
    _opt("train_projector", bool, "--train-projector", help="Train the projector in full. Frozen by default."),
    _opt("freeze_projector", bool, "--freeze-projector", help="Keep the projector frozen (over a YAML)."),
    _opt("freeze_llm", bool, "--freeze-llm", help="Freeze the language model."),
    _opt("train_llm", bool, "--train-llm", help="Train the language model (over a YAML that freezes it)."),
    _opt("vision", str | None, "--vision", help="How the vision tower trains: frozen | lora | full (over the "
         "method's preset)."),
    _opt("projector", str | None, "--projector", help="How the projector trains: frozen | full."),
    _opt("language", str | None, "--language",
         help="How the language model trains: frozen | lora | full | freeze (the last --freeze-trainable-layers). "
              "E.g. --language lora --vision full --projector full: ms-swift's lora_llm_full_vit."),
    _opt("freeze_trainable_layers", int, "--freeze-trainable-layers",
         help="--method freeze: how many last language-model layers train."),
    _opt("precision", str, "--precision",
         help="bf16 (AMP, fp32 trainable weights; LLaMA-Factory's default) | fp16 | fp32 | pure-bf16."),
    _opt("quant_bits", int | None, "--quant-bits", help="QLoRA weight bits: 4 (default for qlora) or 8."),
    _opt("optimizer", str, "--optimizer",
         help="adamw (torch fused, HF default) | adamw-foreach | adamw-8bit | paged-adamw-8bit | sgd | adafactor."),
    _opt("seq_len", int, "--seq-len", "--cutoff-len",
         help="Tokens per sample (LLaMA-Factory cutoff_len), image tokens included."),
    _opt("batch_size", int, "--batch-size", help="Micro-batch per GPU."),
    _opt("gradient_accumulation_steps", int, "--gradient-accumulation-steps", help="Gradient accumulation."),
    _opt("images", int, "--images", help="Images per sample."),
    _opt("image_size", list[str] | None, "--image-size",
         help="Image WxH (repeat for different sizes per image; default: a square at --image-max-pixels)."),
    _opt("image_max_pixels", int, "--image-max-pixels",
         help="LLaMA-Factory pre-resize cap (image_max_pixels)."),
    _opt("image_min_pixels", int, "--image-min-pixels", help="LLaMA-Factory pre-resize floor."),
    _opt("videos", int, "--videos",
         help="Videos per sample (Qwen2-VL, Qwen2.5-VL), after the images; needs --video-size and --video-frames "
              "or --video-duration."),
    _opt("video_size", str | None, "--video-size", help="Video frame size WxH (e.g. 1280x720)."),
    _opt("video_frames", int | None, "--video-frames",
         help="Frames per video: alone, the frames the model gets (a frame list, kept whole by LLaMA-Factory); "
              "with --video-duration, the file's frame count."),
    _opt("video_duration", float | None, "--video-duration",
         help="Seconds per video: LLaMA-Factory samples --video-fps frames a second, at most --video-maxlen."),
    _opt("video_max_pixels", int, "--video-max-pixels", help="LLaMA-Factory pre-resize cap of each video frame."),
    _opt("video_min_pixels", int, "--video-min-pixels", help="LLaMA-Factory pre-resize floor of each video frame."),
    _opt("video_fps", float, "--video-fps", help="LLaMA-Factory frames sampled per second of video."),
    _opt("video_maxlen", int, "--video-maxlen", help="LLaMA-Factory cap on the frames sampled per video."),
    _opt("packing", bool, "--packing/--no-packing",
         help="LLaMA-Factory packing: samples packed into rows of --cutoff-len tokens (with --dataset: the row with "
              "the most vision tokens is planned)."),
    _opt("neat_packing", bool, "--neat-packing/--no-neat-packing",
         help="LLaMA-Factory neat_packing: packing with a block-diagonal mask ((batch, 1, seq, seq) for sdpa/eager)."),
    _opt("attn", str, "--attn", help="sdpa | fa2 | eager."),
    _opt("gradient_checkpointing", bool, "--gradient-checkpointing/--no-gradient-checkpointing",
         help="Activation checkpointing (on by default, as LLaMA-Factory)."),
    _opt("vision_gradient_checkpointing", bool | None,
         "--vision-gradient-checkpointing/--no-vision-gradient-checkpointing",
         help="Checkpoint the vision tower's layers or not, apart from the language model's (ms-swift "
              "vit_gradient_checkpointing; default: as --gradient-checkpointing). Not with --stack llamafactory."),
    _opt("offload_checkpoints", bool, "--offload-checkpoints",
         help="Keep checkpointed layers' inputs in host RAM (LLaMA-Factory use_unsloth_gc; --stack llamafactory)."),
    _opt("liger_kernel", bool, "--liger-kernel/--no-liger-kernel",
         help="Liger kernels as LLaMA-Factory applies them (enable_liger_kernel): fused linear cross-entropy, no "
              "logits (Qwen2-VL/2.5-VL: also Liger RMSNorm/SwiGLU/LayerNorm, with a warning that liger 0.8.5's "
              "patch fails to load on transformers 5.23; Gemma 3: Gemma RMSNorm/GEGLU/RoPE/LayerNorm too; Mllama: "
              "RMSNorm/SwiGLU/RoPE/LayerNorm, no fused loss). Modelled for LLaVA, Qwen2(.5)-VL, Gemma 3 and Mllama "
              "under --stack llamafactory; elsewhere a warning."),
    _opt("stage", str, "--stage",
         help="sft | dpo | kto (LLaMA-Factory's preference stages: DPO's chosen and rejected rows, KTO's target "
              "and KL rows, the reference forward; --stack llamafactory)."),
    _opt("pref_loss", str, "--pref-loss",
         help="With --stage dpo: sigmoid (DPO, a reference model) | orpo | simpo (no reference model)."),
    _opt("pref_ftx", float, "--pref-ftx",
         help="With --stage dpo or kto: weight of the chosen rows' SFT loss (pref_ftx)."),
    _opt("pref_beta", float, "--pref-beta",
         help="With --stage dpo or kto: pref_beta (recorded for the launch configs)."),
    _opt("kto_chosen_weight", float, "--kto-chosen-weight",
         help="With --stage kto: weight of the desirable losses (kto_chosen_weight; recorded for the launch configs)."),
    _opt("kto_rejected_weight", float, "--kto-rejected-weight",
         help="With --stage kto: weight of the undesirable losses (kto_rejected_weight; recorded for the launch "
              "configs)."),
    _opt("gpu", str, "--gpu", help="GPU id (see `vlplan gpus`)."),
    _opt("gpu_memory_gib", float | None, "--gpu-memory-gib", help="Any other GPU: its memory in GiB."),
    _opt("num_gpus", int, "--num-gpus", help="GPUs per node."),
    _opt("num_nodes", int, "--num-nodes", help="Nodes."),
    _opt("zero", int, "--zero", help="DeepSpeed ZeRO stage 0-3 (0: plain DDP)."),
    _opt("offload", str, "--offload",
         help="none | optimizer | all: CPU offload (DeepSpeed; with --sharding fsdp only all: FSDP2's "
              "CPUOffloadPolicy moves parameters, gradients and the optimizer step together)."),
    _opt("sharding", str, "--sharding",
         help="zero (DeepSpeed, --zero picks the stage) | fsdp (PyTorch FSDP2 through accelerate, --fsdp picks the "
              "strategy). vlplan plan also takes auto: the faster of the two that fits."),
    _opt("fsdp", str, "--fsdp",
         help="With --sharding fsdp: full_shard | shard_grad_op (reshard_after_forward false) | hybrid_shard (shard "
              "within a node, replicate across nodes) | no_shard."),
    _opt("stack", str, "--stack",
         help="The training stack that prepares the model: vlplan (vlplan run's own) | llamafactory (implied by "
              "--from-llamafactory) | hf-trainer."),
    _opt("expandable_segments", bool, "--expandable-segments/--no-expandable-segments",
         help="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True for the caching allocator (default: as "
              "LLaMA-Factory's torchrun launch sets it, else as this shell's PYTORCH_CUDA_ALLOC_CONF, else off)."),
    # Files --------------------------------------------------------------------------------------------------------
    _opt("from_llamafactory", Path | None, "--from-llamafactory", panel=FILES_PANEL,
         help="A LLaMA-Factory training YAML (v0.9.1 to current keys); flags given on the command line override it."),
    _opt("deepspeed", Path | None, "--deepspeed", panel=FILES_PANEL,
         help="A DeepSpeed JSON config: ZeRO stage, offload, buckets (overrides the YAML's deepspeed: key)."),
    _opt("accelerate_config", Path | None, "--accelerate-config", panel=FILES_PANEL,
         help="An accelerate launch config (accelerate launch --config_file) with FSDP: strategy, offload, GPUs and "
              "nodes, mixed precision."),
    _opt("dataset", Path | None, "--dataset", panel=FILES_PANEL,
         help="A LLaMA-Factory dataset (JSON/JSONL): plan for its longest sample (images and seq_len from the data)."),
    _opt("percentile", float | None, "--percentile", panel=FILES_PANEL,
         help="With --dataset: plan for the sample at this percentile of total tokens instead of the longest."),
    _opt("dataset_dir", Path | None, "--dataset-dir", panel=FILES_PANEL,
         help="Folder of dataset_info.json's files (default: dataset_info's folder)."),
    _opt("media_dir", Path | None, "--media-dir", panel=FILES_PANEL,
         help="Folder that relative image/video paths are under (default: --dataset-dir, else the data file's)."),
    _opt("dataset_info", Path | None, "--dataset-info", panel=FILES_PANEL,
         help="LLaMA-Factory dataset_info.json describing the dataset's columns and tags."),
    _opt("tokenizer", Path | None, "--tokenizer", panel=FILES_PANEL,
         help="Tokenizer (tokenizer.json or a model folder) for text tokens (default: --model when it is a local "
              "folder; else approximate)."),
]
SETUP_OPTION_NAMES = [p.name for p in SETUP_OPTIONS]
assert SETUP_OPTION_NAMES == list(SETUP_DEFAULTS), "a setup flag per setting of vlplan.planner.resolve, in order"


def setup_command(fn=None, *, dataset_argument: str | None = None, progress=None, auto_sharding: bool = False):
    """Give `fn(setup, ...)` the shared flags; it receives the resolved TrainSetup as `setup`, and the
    `ResolvedSetup` (warnings, sources, dataset scan) as `resolved` when it has such a parameter. Warnings go to
    stderr. `dataset_argument` names a parameter of `fn` (a positional DATA argument) that stands for --dataset;
    `progress(kwargs)` returns a context manager giving a `progress(done, total)` callback (or None) for the scan."""
    if fn is None:
        return functools.partial(setup_command, dataset_argument=dataset_argument, progress=progress,
                                 auto_sharding=auto_sharding)
    signature = inspect.signature(fn)
    own = [p for p in signature.parameters.values() if p.name not in ("setup", "resolved")]
    wants_resolved = "resolved" in signature.parameters
    shared = [p for p in SETUP_OPTIONS if not (dataset_argument and p.name == "dataset")]

    @functools.wraps(fn)
    def wrapper(**kwargs):
        options = {p.name: kwargs.pop(p.name) for p in shared}
        if dataset_argument:
            options["dataset"] = kwargs[dataset_argument]
        with (progress(kwargs) if progress else contextlib.nullcontext()) as callback, errors():
            resolved = resolve_setup(progress=callback, **options)
            if resolved.auto_sharding and not auto_sharding:
                raise VlplanError("--sharding auto lets vlplan plan choose between ZeRO and FSDP; here pass "
                                  "--sharding zero or fsdp")
        for warning in resolved.warnings:
            typer.echo(f"warning: {warning}", err=True)
        if wants_resolved:
            kwargs["resolved"] = resolved
        return fn(setup=resolved.setup, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=own + shared)
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


def llamafactory_files(dataset_parameter: str = "dataset", run_options: bool = True):
    """Let `--from-llamafactory`'s dataset keys stand in for --dataset / --dataset-dir / --dataset-info /
    --media-dir where those flags are not typed, before the shared flags are resolved (the dataset scan sets the
    setup's images and sequence length). With `run_options`, the YAML's run options and warnings are left in the
    context for the command. `dataset_parameter` is the parameter that stands for --dataset."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(**kwargs):
            path = kwargs.get("from_llamafactory")
            if path is not None:
                from vlplan.planner.io.llamafactory_run import llamafactory_dataset, llamafactory_run_options

                with errors():
                    yaml_options, warnings = llamafactory_run_options(path) if run_options else \
                        (llamafactory_dataset(path), [])
                    fill_dataset_flags(kwargs, yaml_options, dataset_parameter, str(path))
                ctx = kwargs.get("ctx")
                if ctx is not None:
                    ctx.meta["llamafactory_run"] = (yaml_options, warnings)
                    ctx.meta["dataset_flags"] = {key: kwargs.get(key) for key in DATASET_FLAGS}
            return fn(**kwargs)

        return wrapper

    return decorate


DATASET_FLAGS = ("dataset", "dataset_dir", "dataset_info", "media_dir")


def fill_dataset_flags(kwargs: dict, yaml_options: dict, dataset_key: str, yaml_name: str) -> None:
    """The YAML's dataset (a dataset_info.json name) where no dataset is typed; its dataset_dir and dataset_info where
    the dataset is a name (not a file) and those flags are not typed; its media_dir where --media-dir is not typed."""
    from vlplan.planner.io.llamafactory_run import one_dataset

    if kwargs.get(dataset_key) is None and "dataset" in yaml_options:
        kwargs[dataset_key] = one_dataset(yaml_options["dataset"], yaml_name)
    dataset = kwargs.get(dataset_key)
    if dataset is not None and not Path(dataset).expanduser().exists() and kwargs.get("dataset_dir") is None:
        for key in ("dataset_dir", "dataset_info"):
            if kwargs.get(key) is None and key in yaml_options:
                kwargs[key] = Path(yaml_options[key])
    if kwargs.get("media_dir") is None and "media_dir" in yaml_options:
        kwargs["media_dir"] = Path(yaml_options["media_dir"])
