"""Resolving a training setup from the settings a user gives (flags, a LLaMA-Factory YAML, a DeepSpeed JSON, a
dataset) into the one `TrainSetup`: the library function behind every command (the CLI's `setup_command`, the
profiler's sweep files). Pure Python, no typer.

Precedence, lowest first: the library's defaults (`SETUP_DEFAULTS`, LLaMA-Factory's), the YAML, the DeepSpeed JSON,
the dataset (images and seq_len), the settings given. A setting is given when it is not None, so a flag the user
typed wins whatever its value (e.g. `--method lora` over a YAML with `finetuning_type: full`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .coverage import setup_warnings
from .errors import VlplanError
from .setup import LF_VIDEO_FPS, LF_VIDEO_MAX_PIXELS, LF_VIDEO_MAXLEN, LF_VIDEO_MIN_PIXELS
from .tokens import LF_IMAGE_MAX_PIXELS, LF_IMAGE_MIN_PIXELS

# Every setting `resolve_setup` takes, with the library's default (LLaMA-Factory's), in the CLI's flag order
SETUP_DEFAULTS = {
    "model": None, "method": "lora", "lora_rank": 8, "lora_alpha": None, "lora_target": "all", "lora_dropout": 0.0,
    "dora": False, "oft_rank": None, "oft_block_size": None, "module_dropout": None, "train_vision": False, "freeze_vision": False, "train_projector": False, "freeze_projector": False,
    "freeze_llm": False, "train_llm": False, "vision": None, "projector": None, "language": None,
    "freeze_trainable_layers": 2, "precision": "bf16", "quant_bits": None,
    "optimizer": "adamw", "seq_len": 2048, "batch_size": 1, "gradient_accumulation_steps": 1, "images": 1,
    "image_size": None, "image_max_pixels": LF_IMAGE_MAX_PIXELS, "image_min_pixels": LF_IMAGE_MIN_PIXELS,
    "videos": 0, "video_size": None, "video_frames": None, "video_duration": None,
    "video_max_pixels": LF_VIDEO_MAX_PIXELS, "video_min_pixels": LF_VIDEO_MIN_PIXELS, "video_fps": LF_VIDEO_FPS,
    "video_maxlen": LF_VIDEO_MAXLEN, "packing": False, "neat_packing": False,
    "attn": "sdpa", "gradient_checkpointing": True,
    "vision_gradient_checkpointing": None, "offload_checkpoints": False, "liger_kernel": False,
    "stage": "sft", "pref_loss": "sigmoid", "pref_ftx": 0.0, "pref_beta": 0.1, "kto_chosen_weight": 1.0,
    "kto_rejected_weight": 1.0, "gpu": "h100-80g",
    "gpu_memory_gib": None, "num_gpus": 1,
    "num_nodes": 1, "zero": 0, "offload": "none", "sharding": "zero", "fsdp": "full_shard", "stack": "vlplan",
    "expandable_segments": None,  # None: from LLaMA-Factory's launcher or PYTORCH_CUDA_ALLOC_CONF, else off
    # files
    "from_llamafactory": None, "deepspeed": None, "accelerate_config": None, "dataset": None, "percentile": None, "dataset_dir": None,
    "media_dir": None, "dataset_info": None, "tokenizer": None,
}
FILE_OPTIONS = ("from_llamafactory", "deepspeed", "accelerate_config", "dataset", "percentile", "dataset_dir", "media_dir", "dataset_info",
                "tokenizer")
# settings that only mean something for LoRA/QLoRA
LORA_OPTIONS = ("lora_rank", "lora_alpha", "lora_target", "lora_dropout", "dora")


@dataclass
class ResolvedSetup:
    """The setup of a command line, with the warnings met on the way and what the files said."""

    setup: object  # TrainSetup
    warnings: list[str] = field(default_factory=list)
    scan: object | None = None  # ScanResult of --dataset
    sample: int | None = None  # the dataset sample the setup plans for
    percentile: float | None = None
    sources: dict[str, str] = field(default_factory=dict)
    typed: set[str] = field(default_factory=set)  # the settings given (flags typed on the command line)
    auto_sharding: bool = False  # `--sharding auto`: vlplan plan picks ZeRO or FSDP (other commands refuse it)

    def json_extras(self) -> dict:
        """What a command adds to its JSON: `warnings`, `sources` and, with --dataset, the scan's summary."""
        extras: dict = {"warnings": self.warnings, "sources": self.sources}
        if self.scan is not None:
            data = self.scan.to_dict()
            extras["dataset"] = {key: data[key] for key in ("path", "samples", "text_tokens_method", "vision_tokens",
                                                              "total_tokens", "longest", "over_cutoff")}
            extras["dataset"].update(planned_sample=self.sample, percentile=self.percentile)
        return extras


def _given_choices(options: dict) -> dict:
    """`make_setup` arguments of the given settings (model left as a name, resolved later)."""
    from .hardware import custom_gpu, find_gpu
    from .tokens import parse_size

    choices: dict = {}
    if options.get("gpu") is not None and options.get("gpu_memory_gib") is not None:
        raise VlplanError(f"--gpu {options['gpu']} and --gpu-memory-gib {options['gpu_memory_gib']:g} contradict: "
                          "--gpu names a GPU of the catalog (its memory is known), --gpu-memory-gib describes any "
                          "other GPU; pass one of them")
    if options.get("gpu_memory_gib") is not None:
        choices["gpu"] = custom_gpu(options["gpu_memory_gib"])
    elif options.get("gpu") is not None:
        choices["gpu"] = find_gpu(options["gpu"])
    for on, off, what, setting in (("train_vision", "freeze_vision", "vision tower", "train_vision"),
                                   ("train_projector", "freeze_projector", "projector", "train_projector"),
                                   ("train_llm", "freeze_llm", "language model", "freeze_llm")):
        if options.get(on) and options.get(off):
            raise VlplanError(f"--{on.replace('_', '-')} and --{off.replace('_', '-')} contradict; pass one to say "
                              f"whether the {what} trains")
        trains = True if options.get(on) else False if options.get(off) else None
        if trains is not None:
            choices[setting] = trains if setting.startswith("train") else not trains
    if options.get("image_size") is not None or options.get("images") is not None:
        sizes = [parse_size(s) for s in options.get("image_size") or []]
        count = options.get("images")
        if len(sizes) > 1:
            if count not in (None, 1, len(sizes)):
                raise VlplanError(f"--images {count} contradicts {len(sizes)} --image-size values; give one "
                                  "--image-size per image or one size with --images N")
            choices["images"] = sizes
        else:
            choices.update(num_images=count if count is not None else SETUP_DEFAULTS["images"],
                           image_size=sizes[0] if sizes else None, images=None)
    if options.get("neat_packing"):
        choices["packing"] = True  # DataArguments.__post_init__: neat_packing turns packing on
    video_flags = ("videos", "video_size", "video_frames", "video_duration")
    if any(options.get(name) is not None for name in video_flags):
        choices["videos"] = _videos(*(options.get(name) for name in video_flags))
    renamed = {"images", "image_size", "gpu", "gpu_memory_gib", "train_vision", "freeze_vision", "train_projector",
               "freeze_projector", "train_llm", "freeze_llm", *video_flags}
    for name, value in options.items():
        if name not in renamed and name not in FILE_OPTIONS and value is not None:
            choices[name] = value
    return choices


def _videos(count: int | None, size: str | None, frames: int | None, duration_s: float | None) -> tuple:
    """--videos N --video-size WxH with --video-frames F (the frames the model gets, a list LLaMA-Factory keeps
    whole) and/or --video-duration S (a file sampled at video_fps up to video_maxlen; with --video-frames, the
    file's frame count caps it) -> N equal `Video`s."""
    from .video import Video, parse_video_size

    if count is not None and count < 0:
        raise VlplanError(f"--videos must be 0 or more, got {count}")
    if count == 0:
        if size is not None or frames is not None or duration_s is not None:
            raise VlplanError("--videos 0 contradicts --video-size/--video-frames/--video-duration; drop them or "
                              "give --videos N")
        return ()
    if size is None:
        raise VlplanError("a video needs its size: add --video-size WxH (e.g. 1280x720)")
    if frames is None and duration_s is None:
        raise VlplanError("a video needs --video-frames F (frames the model gets) or --video-duration S (seconds, "
                          "sampled at --video-fps up to --video-maxlen frames)")
    width, height = parse_video_size(size)
    return (Video(width, height, frames=frames, duration_s=duration_s),) * (1 if count is None else count)


def _library_defaults() -> dict:
    """`make_setup` arguments of the library's defaults (LLaMA-Factory's): the lowest layer of the precedence."""
    defaults = {name: value for name, value in SETUP_DEFAULTS.items()
                if name not in FILE_OPTIONS and value is not None}
    defaults.pop("gpu")  # the GPU default is make_setup's own (a catalog GPU), applied only when nothing names one
    return _given_choices(defaults)


def resolve_setup(progress=None, environ: Mapping[str, str] | None = None, **options) -> ResolvedSetup:
    """The TrainSetup of the given settings and files (names as in `SETUP_DEFAULTS`; errors are VlplanError). A
    setting given as None (or left out) is not given; see the module docstring for the precedence of settings, YAML,
    DeepSpeed JSON and dataset. `progress(done, total)` is called while a dataset is scanned. `environ` (default:
    this process's environment) is where PYTORCH_CUDA_ALLOC_CONF and LLaMA-Factory's OPTIM_TORCH are read when
    `expandable_segments` is not given (`expandable_segments_default`)."""
    from .io.deepspeed import read_deepspeed
    from .io.llamafactory import build_setup, deepspeed_consistency, llamafactory_choices
    from .versions import transformers_warning

    unknown = set(options) - set(SETUP_DEFAULTS)
    if unknown:
        raise VlplanError(f"unknown setup option(s) {', '.join(sorted(unknown))}")
    options = {name: options.get(name) for name in SETUP_DEFAULTS}
    auto_sharding = options["sharding"] == "auto"
    if auto_sharding:  # vlplan plan chooses between ZeRO and FSDP; the setup starts from the default
        options["sharding"] = None
    explicit = {name: value for name, value in options.items() if name not in FILE_OPTIONS and value is not None}
    resolved = ResolvedSetup(setup=None, typed=set(explicit), auto_sharding=auto_sharding)
    version_warning = transformers_warning()  # the installed transformers, if any: the one training would run
    if version_warning:
        resolved.warnings.append(version_warning)
    flags = _given_choices(explicit)
    choices = _library_defaults()
    if options["from_llamafactory"]:
        path = options["from_llamafactory"]
        yaml_choices, warnings = llamafactory_choices(path, read_deepspeed_key=not options["deepspeed"])
        resolved.warnings += warnings
        resolved.sources["llamafactory"] = str(path)
        choices.update(yaml_choices)
    if options["deepspeed"]:
        path = options["deepspeed"]
        ds, warnings = read_deepspeed(path)
        resolved.warnings += warnings
        resolved.sources["deepspeed"] = str(path)
        choices.update(ds.setup_fields())
        # numbers the JSON pins (not "auto") hold where no flag or YAML sets them
        for value, key in ((ds.micro_batch_size, "batch_size"), (ds.gradient_accumulation_steps,
                                                                 "gradient_accumulation_steps"),
                           (ds.gradient_clipping, "max_grad_norm")):
            if value is not None and not options["from_llamafactory"] and key not in explicit:
                choices[key] = value
        if not options["from_llamafactory"] and "precision" not in explicit:
            if ds.fp16 or ds.bf16:
                choices["precision"] = "fp16" if ds.fp16 else "bf16"
            elif ds.fp16 is False and ds.bf16 is False:
                choices["precision"] = "fp32"  # both switched off: DeepSpeed trains in fp32
        resolved.warnings += deepspeed_consistency(ds, {**choices, **flags}, str(path))
    if options["accelerate_config"]:
        from .io.accelerate import read_accelerate_config

        if options["deepspeed"]:
            raise VlplanError("--deepspeed and --accelerate-config both say how to shard; pass one of them")
        path = options["accelerate_config"]
        acc, warnings = read_accelerate_config(path)
        resolved.warnings += warnings
        resolved.sources["accelerate"] = str(path)
        choices.update(acc.setup_fields())
        if acc.precision is not None and not options["from_llamafactory"] and "precision" not in explicit:
            choices["precision"] = acc.precision
    choices.update(flags)
    _component_flags_over_presets(choices, flags)
    _drop_file_lora_settings(choices, flags)
    if choices.get("sharding") == "fsdp" and {"ds_reduce_bucket_size", "ds_overlap_comm"} & set(choices):
        # a DeepSpeed file read before a flag switched to FSDP: its bucket settings have no FSDP meaning
        choices.pop("ds_reduce_bucket_size", None)
        choices.pop("ds_overlap_comm", None)
        resolved.warnings.append("--sharding fsdp: the DeepSpeed config's settings (reduce buckets) are not used")
    if not choices.get("model"):
        raise VlplanError("no model: pass --model NAME (see `vlplan models`) or --from-llamafactory with "
                          "model_name_or_path")
    if options["dataset"] is None:
        if options["percentile"] is not None:
            raise VlplanError("--percentile needs --dataset")
        resolved.setup = build_setup(choices)
    else:
        resolved.sources["dataset"] = str(options["dataset"])
        if {"images", "image_size"} & set(explicit):
            resolved.warnings.append("--images/--image-size are ignored: the images come from --dataset")
        if {"videos", "video_size", "video_frames", "video_duration"} & set(explicit):
            resolved.warnings.append("--videos/--video-size/--video-frames/--video-duration are ignored: the videos "
                                     "come from --dataset")
        base = build_setup({**choices, "images": [], "num_images": None, "image_size": None, "videos": ()})
        resolved.setup, resolved.scan, warnings = _dataset_setup(base, options, choices, progress)
        resolved.sample, resolved.percentile = resolved.scan.pick(options["percentile"]), options["percentile"]
        resolved.warnings += warnings
    if "expandable_segments" not in explicit:
        expandable, source = expandable_segments_default(resolved.setup, os.environ if environ is None else environ)
        if source:
            resolved.setup = replace(resolved.setup, expandable_segments=expandable)
            resolved.sources["expandable_segments"] = source
    resolved.warnings += [w for w in setup_warnings(resolved.setup) if w not in resolved.warnings]
    return resolved


def expandable_segments_default(setup, environ: Mapping[str, str]) -> tuple[bool, str | None]:
    """Whether the training process will run with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True when no setting
    says so, and why (None: nothing says so; off).
    - LLaMA-Factory (>= 0.9.3) launches every run of more than one process through torchrun and, unless OPTIM_TORCH
      is switched off (default "1"), sets `env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"` for it,
      over what the environment says (llamafactory/launcher.py `launch`; shared/reference/llamafactory.md). A
      single-GPU run is not launched by torchrun (unless FORCE_TORCHRUN) and keeps the environment's value.
    - Otherwise PYTORCH_CUDA_ALLOC_CONF of `environ` (the shell the training would start from), parsed as
      c10/cuda/CUDAAllocatorConfig.cpp `parseArgs` does: comma-separated `key:value`, `expandable_segments` True or
      False (the last one wins)."""
    def enabled(name: str, default: str) -> bool:  # llamafactory.extras.misc.is_env_enabled
        return environ.get(name, default).lower() in ("true", "y", "1")

    torchrun = setup.world_size > 1 or enabled("FORCE_TORCHRUN", "0")
    if setup.stack == "llamafactory" and torchrun and enabled("OPTIM_TORCH", "1"):
        return True, "LLaMA-Factory's torchrun launch sets PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    conf = environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    value = None
    for item in conf.replace(" ", "").split(","):
        key, _, setting = item.partition(":")
        if key == "expandable_segments":
            if setting not in ("True", "False"):
                raise VlplanError(f"PYTORCH_CUDA_ALLOC_CONF={conf}: expandable_segments takes True or False (as "
                                  f"torch requires), not {setting!r}")
            value = setting == "True"
    if value is None:
        return False, None
    return value, f"PYTORCH_CUDA_ALLOC_CONF={conf}"


def _component_flags_over_presets(choices: dict, flags: dict) -> None:
    """A typed `--vision/--projector/--language` mode wins over what a YAML's presets say for that component (its
    freeze keys, its finetuning_type where the mode implies another method); against a typed preset flag it is
    refused by `make_setup`."""
    from .setup import implied_method

    for key, preset in (("vision", "train_vision"), ("projector", "train_projector"), ("language", "freeze_llm")):
        if key in flags and preset not in flags:
            choices.pop(preset, None)
    implied = implied_method(flags.get("vision"), flags.get("projector"), flags.get("language"))
    if implied is not None and "method" not in flags and choices.get("method") not in (implied, "qlora", "oft"):
        choices["method"] = implied


def _drop_file_lora_settings(choices: dict, flags: dict) -> None:
    """LoRA settings only mean something for LoRA/QLoRA (OFT reads lora_target only): a typed LoRA flag with another
    method is refused; LoRA keys of a YAML are dropped when a flag switches the method to full, freeze or oft."""
    method = choices.get("method", SETUP_DEFAULTS["method"])
    if method in ("lora", "qlora"):
        return
    # OFT adapts the linears LLaMA-Factory's `lora_target` names (adapter.py `_setup_lora_tuning`)
    kept = ("lora_target",) if method == "oft" else ()
    typed = [name for name in LORA_OPTIONS if name in flags and name not in kept]
    if typed:
        flag = "--" + typed[0].replace("_", "-")
        raise VlplanError(f"{flag} applies to LoRA adapters, but the method is {choices['method']}; use --method lora "
                          f"or qlora, or drop {flag}")
    for name in LORA_OPTIONS:
        if name not in kept:
            choices.pop(name, None)


def _dataset_setup(base, options: dict, choices: dict, progress):
    from .dataset import scan_dataset, setup_for_dataset

    tokenizer = options["tokenizer"]
    model = choices.get("model")
    if tokenizer is None and isinstance(model, str) and Path(model).expanduser().is_dir():
        tokenizer = Path(model).expanduser()
    scan = scan_dataset(options["dataset"], base.model, dataset_dir=options["dataset_dir"],
                        media_dir=options["media_dir"], dataset_info=options["dataset_info"],
                        image_max_pixels=base.image_max_pixels, image_min_pixels=base.image_min_pixels,
                        cutoff_len=base.seq_len, tokenizer=tokenizer,
                        progress=progress, video_max_pixels=base.video_max_pixels,
                        video_min_pixels=base.video_min_pixels, video_fps=base.video_fps,
                        video_maxlen=base.video_maxlen)
    setup, warnings = setup_for_dataset(base, scan, options["percentile"])
    return setup, scan, warnings
