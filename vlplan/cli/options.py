"""The model/method/precision/data/parallelism flags shared by estimate, trace, plan and profile.

Declared once (`SETUP_OPTIONS`) and attached to each command by `@setup_command`, which turns them into the one
`TrainSetup` the command receives. Defaults follow LLaMA-Factory's.

The setup can also come from files: `--from-llamafactory train.yaml` (a LLaMA-Factory training config),
`--deepspeed ds.json` (a DeepSpeed config) and `--dataset data.json` (the images and sequence length of the longest
sample, or of `--percentile`). Precedence, lowest first: the library's defaults, the YAML, the DeepSpeed JSON, the dataset (images and
seq_len), flags typed on the command line. Every setup flag parses to None when it is not given, so a flag the user
typed wins whatever its value (e.g. `--method lora` over a YAML with `finetuning_type: full`), and the defaults
(`OPTION_DEFAULTS`, LLaMA-Factory's) are applied here, after the files. `resolve_options` is the one function that
applies this, for every command.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import typer

from vlplan.planner.coverage import setup_warnings
from vlplan.planner.errors import VlplanError

K = inspect.Parameter.KEYWORD_ONLY


def _opt(name: str, default, annotation, *flags: str, help: str, panel: str | None = None):
    """A setup flag that parses to None when not typed; `default` is the library's value, shown in --help and
    applied by `resolve_options` after the config files."""
    if annotation is not None and not (isinstance(annotation, type(int | None)) and type(None) in annotation.__args__):
        annotation = annotation | None
    shown = True if default is None else ("on" if default is True else "off" if default is False else str(default))
    option = typer.Option(None, *flags, help=help, show_default=shown if default is not None else False,
                          rich_help_panel=panel)
    _LIBRARY_DEFAULTS[name] = default
    return inspect.Parameter(name, K, default=option, annotation=annotation)


_LIBRARY_DEFAULTS: dict = {}


FILES_PANEL = "Config files and data"


SETUP_OPTIONS = [
    _opt("model", None, str | None, "--model", "-m",
         help="Registry name (see `vlplan models`), hub id, or a local config.json / model directory. Required "
              "unless --from-llamafactory names one (model_name_or_path)."),
    _opt("method", "lora", str, "--method", help="full | freeze | lora | qlora."),
    _opt("lora_rank", 8, int, "--lora-rank", help="LoRA rank."),
    _opt("lora_alpha", None, int | None, "--lora-alpha", help="LoRA alpha (default: 2 x rank, as LLaMA-Factory)."),
    _opt("lora_target", "all", str, "--lora-target",
         help="all, or comma-separated linear names (q_proj,v_proj,...). all = every linear of the LoRA-trained "
              "components except lm_head and the projector."),
    _opt("lora_dropout", 0.0, float, "--lora-dropout",
         help="LoRA dropout on each adapter's input (LLaMA-Factory lora_dropout; ms-swift's default is 0.05)."),
    _opt("dora", False, bool, "--dora", help="DoRA instead of LoRA."),
    _opt("train_vision", False, bool, "--train-vision",
         help="Train the vision tower (in full for full/freeze, with LoRA for lora/qlora). Frozen by default."),
    _opt("freeze_vision", False, bool, "--freeze-vision", help="Keep the vision tower frozen (over a YAML)."),
    _opt("train_projector", False, bool, "--train-projector", help="Train the projector in full. Frozen by default."),
    _opt("freeze_projector", False, bool, "--freeze-projector", help="Keep the projector frozen (over a YAML)."),
    _opt("freeze_llm", False, bool, "--freeze-llm", help="Freeze the language model."),
    _opt("train_llm", False, bool, "--train-llm", help="Train the language model (over a YAML that freezes it)."),
    _opt("freeze_trainable_layers", 2, int, "--freeze-trainable-layers",
         help="--method freeze: how many last language-model layers train."),
    _opt("precision", "bf16", str, "--precision",
         help="bf16 (AMP, fp32 trainable weights; LLaMA-Factory's default) | fp16 | fp32 | pure-bf16."),
    _opt("quant_bits", None, int | None, "--quant-bits", help="QLoRA weight bits: 4 (default for qlora) or 8."),
    _opt("optimizer", "adamw", str, "--optimizer",
         help="adamw (torch fused, HF default) | adamw-foreach | adamw-8bit | paged-adamw-8bit | sgd | adafactor."),
    _opt("seq_len", 2048, int, "--seq-len", "--cutoff-len",
         help="Tokens per sample (LLaMA-Factory cutoff_len), image tokens included."),
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
    _opt("stack", "vlplan", str, "--stack",
         help="The training stack that prepares the model: vlplan (vlplan run's own) | llamafactory (implied by "
              "--from-llamafactory) | hf-trainer."),
    # Files --------------------------------------------------------------------------------------------------------
    _opt("from_llamafactory", None, Path | None, "--from-llamafactory", panel=FILES_PANEL,
         help="A LLaMA-Factory training YAML (v0.9.1 to current keys); flags given on the command line override it."),
    _opt("deepspeed", None, Path | None, "--deepspeed", panel=FILES_PANEL,
         help="A DeepSpeed JSON config: ZeRO stage, offload, buckets (overrides the YAML's deepspeed: key)."),
    _opt("dataset", None, Path | None, "--dataset", panel=FILES_PANEL,
         help="A LLaMA-Factory dataset (JSON/JSONL): plan for its longest sample (images and seq_len from the data)."),
    _opt("percentile", None, float | None, "--percentile", panel=FILES_PANEL,
         help="With --dataset: plan for the sample at this percentile of total tokens instead of the longest."),
    _opt("dataset_dir", None, Path | None, "--dataset-dir", panel=FILES_PANEL,
         help="Folder of dataset_info.json's files (default: dataset_info's folder)."),
    _opt("media_dir", None, Path | None, "--media-dir", panel=FILES_PANEL,
         help="Folder that relative image/video paths are under (default: --dataset-dir, else the data file's)."),
    _opt("dataset_info", None, Path | None, "--dataset-info", panel=FILES_PANEL,
         help="LLaMA-Factory dataset_info.json describing the dataset's columns and tags."),
    _opt("tokenizer", None, Path | None, "--tokenizer", panel=FILES_PANEL,
         help="Tokenizer (tokenizer.json or a model folder) for text tokens (default: --model when it is a local "
              "folder; else approximate)."),
]
SETUP_OPTION_NAMES = [p.name for p in SETUP_OPTIONS]
OPTION_DEFAULTS = dict(_LIBRARY_DEFAULTS)
# flags that only mean something for LoRA/QLoRA
LORA_OPTIONS = ("lora_rank", "lora_alpha", "lora_target", "lora_dropout", "dora")
FILE_OPTIONS = ("from_llamafactory", "deepspeed", "dataset", "percentile", "dataset_dir", "media_dir", "dataset_info",
                "tokenizer")


@dataclass
class ResolvedSetup:
    """The setup of a command line, with the warnings met on the way and what the files said."""

    setup: object  # TrainSetup
    warnings: list[str] = field(default_factory=list)
    scan: object | None = None  # ScanResult of --dataset
    sample: int | None = None  # the dataset sample the setup plans for
    percentile: float | None = None
    sources: dict[str, str] = field(default_factory=dict)
    typed: set[str] = field(default_factory=set)  # the setup flags given on the command line

    def json_extras(self) -> dict:
        """What a command adds to its JSON: `warnings`, `sources` and, with --dataset, the scan's summary."""
        extras: dict = {"warnings": self.warnings, "sources": self.sources}
        if self.scan is not None:
            data = self.scan.to_dict()
            extras["dataset"] = {key: data[key] for key in ("path", "samples", "text_tokens_method", "vision_tokens",
                                                              "total_tokens", "longest", "over_cutoff")}
            extras["dataset"].update(planned_sample=self.sample, percentile=self.percentile)
        return extras


def _cli_choices(options: dict) -> dict:
    """`make_setup` arguments of the given shared flags (model left as a name, resolved later)."""
    from vlplan.planner.hardware import custom_gpu, find_gpu
    from vlplan.planner.tokens import parse_size

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
            choices.update(num_images=count if count is not None else OPTION_DEFAULTS["images"],
                           image_size=sizes[0] if sizes else None, images=None)
    renamed = {"images", "image_size", "gpu", "gpu_memory_gib", "train_vision", "freeze_vision", "train_projector",
               "freeze_projector", "train_llm", "freeze_llm"}
    for name, value in options.items():
        if name not in renamed and name not in FILE_OPTIONS and value is not None:
            choices[name] = value
    return choices


def _library_defaults() -> dict:
    """`make_setup` arguments of the library's defaults (LLaMA-Factory's): the lowest layer of the precedence."""
    defaults = {name: value for name, value in OPTION_DEFAULTS.items()
                if name not in FILE_OPTIONS and value is not None}
    defaults.pop("gpu")  # the GPU default is make_setup's own (a catalog GPU), applied only when nothing names one
    return _cli_choices(defaults)


def resolve_options(progress=None, **options) -> ResolvedSetup:
    """The TrainSetup of the shared flags and files (library call; errors are VlplanError). An option given as None
    (or left out) is not given; see the module docstring for the precedence of flags, YAML, DeepSpeed JSON and
    dataset. `progress(done, total)` is called while a --dataset is scanned."""
    from vlplan.planner.io.deepspeed import read_deepspeed
    from vlplan.planner.io.llamafactory import build_setup, deepspeed_consistency, llamafactory_choices
    from vlplan.planner.versions import transformers_warning

    unknown = set(options) - set(OPTION_DEFAULTS)
    if unknown:
        raise VlplanError(f"unknown setup option(s) {', '.join(sorted(unknown))}")
    options = {name: options.get(name) for name in OPTION_DEFAULTS}
    explicit = {name: value for name, value in options.items() if name not in FILE_OPTIONS and value is not None}
    resolved = ResolvedSetup(setup=None, typed=set(explicit))
    version_warning = transformers_warning()  # the installed transformers, if any: the one training would run
    if version_warning:
        resolved.warnings.append(version_warning)
    flags = _cli_choices(explicit)
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
    choices.update(flags)
    _drop_file_lora_settings(choices, flags)
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
        base = build_setup({**choices, "images": [], "num_images": None, "image_size": None})
        resolved.setup, resolved.scan, warnings = _dataset_setup(base, options, choices, progress)
        resolved.sample, resolved.percentile = resolved.scan.pick(options["percentile"]), options["percentile"]
        resolved.warnings += warnings
    resolved.warnings += [w for w in setup_warnings(resolved.setup) if w not in resolved.warnings]
    return resolved


def _drop_file_lora_settings(choices: dict, flags: dict) -> None:
    """LoRA settings only mean something for LoRA/QLoRA: a typed LoRA flag with another method is refused; LoRA keys
    of a YAML are dropped when a flag switches the method to full or freeze."""
    if choices.get("method", OPTION_DEFAULTS["method"]) in ("lora", "qlora"):
        return
    typed = [name for name in LORA_OPTIONS if name in flags]
    if typed:
        flag = "--" + typed[0].replace("_", "-")
        raise VlplanError(f"{flag} applies to LoRA adapters, but the method is {choices['method']}; use --method lora "
                          f"or qlora, or drop {flag}")
    for name in LORA_OPTIONS:
        choices.pop(name, None)


def _dataset_setup(base, options: dict, choices: dict, progress):
    from vlplan.planner.dataset import scan_dataset, setup_for_dataset

    tokenizer = options["tokenizer"]
    model = choices.get("model")
    if tokenizer is None and isinstance(model, str) and Path(model).expanduser().is_dir():
        tokenizer = Path(model).expanduser()
    scan = scan_dataset(options["dataset"], base.model, dataset_dir=options["dataset_dir"],
                        media_dir=options["media_dir"], dataset_info=options["dataset_info"],
                        image_max_pixels=base.image_max_pixels, image_min_pixels=base.image_min_pixels,
                        cutoff_len=base.seq_len + 1 if base.packing else base.seq_len, tokenizer=tokenizer,
                        progress=progress)
    setup, warnings = setup_for_dataset(base, scan, options["percentile"])
    return setup, scan, warnings


def setup_command(fn=None, *, dataset_argument: str | None = None, progress=None):
    """Give `fn(setup, ...)` the shared flags; it receives the resolved TrainSetup as `setup`, and the
    `ResolvedSetup` (warnings, sources, dataset scan) as `resolved` when it has such a parameter. Warnings go to
    stderr. `dataset_argument` names a parameter of `fn` (a positional DATA argument) that stands for --dataset;
    `progress(kwargs)` returns a context manager giving a `progress(done, total)` callback (or None) for the scan."""
    if fn is None:
        return functools.partial(setup_command, dataset_argument=dataset_argument, progress=progress)
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
            resolved = resolve_options(progress=callback, **options)
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
