"""LLaMA-Factory training YAMLs <-> TrainSetup.

`setup_from_llamafactory(path_or_dict, **overrides)` reads every memory-relevant key of a `llamafactory-cli train`
YAML, from v0.9.0's names (`image_resolution`, `train_mm_proj_only`, `quantization_method: bitsandbytes`) to the
current ones, fills what is missing with LLaMA-Factory's defaults of the version the file is written for (and HF
TrainingArguments' defaults: `per_device_train_batch_size` is 8 when absent), and returns the TrainSetup plus a
warning for every key it reads but does not model. `llamafactory_yaml(setup, version=...)` writes the memory keys of
a setup as a YAML dict with only keys that version accepts; `training_yaml(setup, base=...)` makes it a complete
training file (the input YAML's other keys kept, or LLaMA-Factory's example run settings and the model's chat
template, with placeholders marked), which tests/test_llamafactory_parser.py holds to LLaMA-Factory's own parser.
Keys, defaults and code paths: shared/reference/llamafactory.md section 1.

The fields of a TrainSetup that no LLaMA-Factory key holds (the images per sample, the GPU, `num_gpus`/`num_nodes`,
which LLaMA-Factory takes from the environment) come from `overrides`, else from `make_setup`'s defaults.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ..errors import VlplanError
from ..setup import HF_OPTIM, Train, TrainSetup, make_setup
from .deepspeed import DeepSpeedSettings, deepspeed_from_name, read_deepspeed

# ---------------------------------------------------------------------------------------------------------------------
# LLaMA-Factory's key set, as data.
# Source: the dataclass fields of src/llamafactory/hparams/{model_args,data_args,finetuning_args,generating_args,
# training_args}.py in the llamafactory 0.9.5 wheel (PyPI, 2026-05; read with `ast`, every field checked present
# here), united with those of hiyouga/LLaMA-Factory commit 00577a85775a (2026: KTransformers and Ray fields) and the
# v0.9.1 / v0.9.3 tags quoted in shared/reference/llamafactory.md. Fields declared `init=False` (compute_dtype,
# device_map, model_max_length, block_diag_attn) are not accepted from a YAML and are left out.
# Every key belongs to one of these dataclasses or to transformers' Seq2SeqTrainingArguments; anything else makes
# HfArgumentParser raise "Some specified arguments are not used by the HfArgumentParser" (unless ALLOW_EXTRA_ARGS=1).
# ---------------------------------------------------------------------------------------------------------------------
LLAMAFACTORY_SOURCE = ("llamafactory 0.9.5 (PyPI) and hiyouga/LLaMA-Factory @ 00577a85775a: "
                       "src/llamafactory/hparams/*.py; v0.9.1 and v0.9.3 per shared/reference/llamafactory.md")

MODEL_ARGUMENTS_KEYS = frozenset({
    # BaseModelArguments
    "model_name_or_path", "adapter_name_or_path", "adapter_folder", "cache_dir", "use_fast_tokenizer", "resize_vocab",
    "split_special_tokens", "add_tokens", "add_special_tokens", "new_special_tokens_config", "init_special_tokens",
    "model_revision", "low_cpu_mem_usage", "rope_scaling", "flash_attn", "shift_attn", "mixture_of_depths",
    "use_unsloth", "use_unsloth_gc", "enable_liger_kernel", "moe_aux_loss_coef", "disable_gradient_checkpointing",
    "use_reentrant_gc", "upcast_layernorm", "upcast_lmhead_output", "train_from_scratch", "infer_backend",
    "offload_folder", "use_kv_cache", "use_v1_kernels", "infer_dtype", "hf_hub_token", "ms_hub_token", "om_hub_token",
    "print_param_status", "trust_remote_code",
    # QuantizationArguments
    "quantization_method", "quantization_bit", "quantization_type", "double_quantization", "quantization_device_map",
    "fp8", "fp8_backend", "fp8_enable_fsdp_float8_all_gather",
    # ProcessorArguments (v0.9.1: image_resolution / video_resolution instead of *_max_pixels, see VERSIONED_KEYS)
    "image_max_pixels", "image_min_pixels", "image_do_pan_and_scan", "crop_to_patches", "video_max_pixels",
    "video_min_pixels", "video_fps", "video_maxlen", "use_audio_in_video", "audio_sampling_rate",
    "image_resolution", "video_resolution",
    # ExportArguments
    "export_dir", "export_size", "export_device", "export_quantization_bit", "export_quantization_dataset",
    "export_quantization_nsamples", "export_quantization_maxlen", "export_legacy_format", "export_hub_model_id",
    # VllmArguments, SGLangArguments, KTransformersArguments
    "vllm_maxlen", "vllm_gpu_util", "vllm_enforce_eager", "vllm_max_lora_rank", "vllm_config",
    "sglang_maxlen", "sglang_mem_fraction", "sglang_tp_size", "sglang_config", "sglang_lora_backend",
    "use_kt", "kt_optimize_rule", "cpu_infer", "chunk_size", "mode", "kt_maxlen", "kt_use_cuda_graph", "kt_mode",
    "kt_force_think", "kt_weight_path", "kt_use_lora_experts", "kt_lora_expert_num", "kt_lora_expert_intermediate_size",
    "kt_expert_checkpoint_path",
})
DATA_ARGUMENTS_KEYS = frozenset({
    "template", "dataset", "eval_dataset", "dataset_dir", "media_dir", "cutoff_len", "train_on_prompt", "mask_history",
    "streaming", "buffer_size", "mix_strategy", "interleave_probs", "overwrite_cache", "preprocessing_batch_size",
    "preprocessing_num_workers", "max_samples", "eval_num_beams", "ignore_pad_token_for_loss", "val_size",
    "eval_on_each_dataset", "packing", "neat_packing", "tool_format", "default_system", "enable_thinking",
    "tokenized_path", "data_shared_file_system", "preserve_thinking",
})
FINETUNING_ARGUMENTS_KEYS = frozenset({
    # FreezeArguments
    "freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules",
    # LoraArguments
    "additional_target", "lora_alpha", "lora_dropout", "lora_rank", "lora_target", "loraplus_lr_ratio",
    "loraplus_lr_embedding", "use_rslora", "use_dora", "pissa_init", "pissa_iter", "pissa_convert",
    "create_new_adapter",
    # OFTArguments (>= v0.9.4)
    "module_dropout", "oft_rank", "oft_block_size", "oft_target",
    # RLHFArguments
    "pref_beta", "pref_ftx", "pref_bco_weight", "pref_loss", "dpo_label_smoothing", "kto_chosen_weight",
    "kto_rejected_weight", "simpo_gamma", "ppo_buffer_size", "ppo_epochs", "ppo_score_norm", "ppo_target",
    "ppo_whiten_rewards", "ref_model", "ref_model_adapters", "ref_model_quantization_bit", "reward_model",
    "reward_model_adapters", "reward_model_quantization_bit", "reward_model_type", "ld_alpha",
    # GaloreArguments, ApolloArguments, BAdamArgument
    "use_galore", "galore_target", "galore_rank", "galore_update_interval", "galore_scale", "galore_proj_type",
    "galore_layerwise", "use_apollo", "apollo_target", "apollo_rank", "apollo_update_interval", "apollo_scale",
    "apollo_proj", "apollo_proj_type", "apollo_scale_type", "apollo_layerwise", "apollo_scale_front", "use_badam",
    "badam_mode", "badam_start_block", "badam_switch_mode", "badam_switch_interval", "badam_update_ratio",
    "badam_mask_mode", "badam_verbose",
    # SwanLabArguments
    "use_swanlab", "swanlab_project", "swanlab_workspace", "swanlab_run_name", "swanlab_mode", "swanlab_api_key",
    "swanlab_logdir", "swanlab_lark_webhook_url", "swanlab_lark_secret",
    # FinetuningArguments
    "pure_bf16", "stage", "finetuning_type", "use_llama_pro", "use_adam_mini", "use_mca", "use_muon", "use_dft_loss",
    "freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model", "train_mm_proj_only",
    "compute_accuracy", "disable_shuffling", "early_stopping_steps", "plot_loss", "include_effective_tokens_per_second",
    "use_asft_loss", "asft_alpha", "use_eaft_loss", "eaft_alpha", "use_hyper_parallel", "hyper_parallel_args",
})
GENERATING_ARGUMENTS_KEYS = frozenset({
    "do_sample", "temperature", "top_p", "top_k", "num_beams", "max_length", "max_new_tokens", "repetition_penalty",
    "length_penalty", "skip_special_tokens",
})
# LLaMA-Factory's TrainingArguments subclass adds these (RayArguments, ProfilerArguments, Fp8Arguments) to
# transformers' Seq2SeqTrainingArguments
TRAINING_ARGUMENTS_EXTRA_KEYS = frozenset({
    "ray_run_name", "ray_storage_path", "ray_storage_filesystem", "ray_num_workers", "resources_per_worker",
    "placement_strategy", "ray_init_kwargs", "master_addr", "master_port", "overwrite_output_dir",
    "enable_torch_profiler", "profiler_output_dir", "profiler_wait_steps", "profiler_warmup_steps",
    "profiler_active_steps", "profiler_repeat", "profiler_record_shapes", "profiler_profile_memory",
    "profiler_with_stack", "profile_modules",
})
# Keys that exist only in some versions: key -> (first version, last version), inclusive, None = open-ended.
# image_resolution/video_resolution/train_mm_proj_only were replaced in #7231 (2025-03-10, before the v0.9.2 tag);
# image_min_pixels came with #6975 (2025-02-18); OFT with #8623 (2025-08-18, v0.9.4).
VERSIONED_KEYS = {
    "image_resolution": (None, "0.9.1"), "video_resolution": (None, "0.9.1"), "train_mm_proj_only": (None, "0.9.1"),
    "image_max_pixels": ("0.9.2", None), "image_min_pixels": ("0.9.2", None), "video_max_pixels": ("0.9.2", None),
    "video_min_pixels": ("0.9.2", None), "freeze_multi_modal_projector": ("0.9.2", None),
    "freeze_language_model": ("0.9.2", None), "module_dropout": ("0.9.4", None), "oft_rank": ("0.9.4", None),
    "oft_block_size": ("0.9.4", None), "oft_target": ("0.9.4", None),
}
VERSIONS = ("0.9.0", "0.9.1", "0.9.2", "0.9.3", "0.9.4", "latest")
# quantization_method values: <= v0.9.2 a Literal with "bitsandbytes"; >= v0.9.3 the QuantizationMethod enum
# (extras/constants.py), renamed "bitsandbytes" -> "bnb" in #7623; HEAD adds mxfp4 and fp8
QUANTIZATION_METHODS_OLD = ("bitsandbytes", "hqq", "eetq")
QUANTIZATION_METHODS = ("bnb", "gptq", "awq", "aqlm", "quanto", "eetq", "hqq", "mxfp4", "fp8")
# flash_attn (AttentionFunction): auto leaves transformers' default (sdpa), disabled = eager; HEAD adds fa3
FLASH_ATTN = {"auto": "sdpa", "disabled": "eager", "sdpa": "sdpa", "fa2": "fa2", "fa3": "fa2"}


def _version_key(version: str) -> tuple[int, ...]:
    return (99,) if version == "latest" else tuple(int(part) for part in version.split("."))


def check_version(version: str) -> str:
    if version not in VERSIONS:
        raise VlplanError(f"LLaMA-Factory version {version!r} is not one of {', '.join(VERSIONS)}")
    return version


def llamafactory_keys(version: str = "latest") -> frozenset[str]:
    """Every key LLaMA-Factory `version` accepts from its own dataclasses (TrainingArguments' fields come on top)."""
    v = _version_key(check_version(version))
    keys = set(MODEL_ARGUMENTS_KEYS | DATA_ARGUMENTS_KEYS | FINETUNING_ARGUMENTS_KEYS | GENERATING_ARGUMENTS_KEYS
               | TRAINING_ARGUMENTS_EXTRA_KEYS)
    for key, (first, last) in VERSIONED_KEYS.items():
        if (first and v < _version_key(first)) or (last and v > _version_key(last)):
            keys.discard(key)
    return frozenset(keys)


# transformers TrainingArguments fields that training YAMLs commonly carry (the full set is introspected in the tests;
# the planner does not import transformers). Keys outside every list are reported as unknown.
COMMON_TRAINING_ARGUMENTS = frozenset({
    "output_dir", "do_train", "do_eval", "do_predict", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
    "max_grad_norm", "num_train_epochs", "max_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio",
    "warmup_steps", "logging_steps", "logging_dir", "logging_strategy", "logging_first_step", "save_steps",
    "save_strategy", "save_total_limit", "save_only_model", "save_safetensors", "eval_steps", "eval_strategy",
    "evaluation_strategy", "seed", "data_seed", "bf16", "fp16", "tf32", "optim", "optim_args", "gradient_checkpointing",
    "gradient_checkpointing_kwargs", "deepspeed", "fsdp", "fsdp_config", "ddp_timeout", "ddp_find_unused_parameters",
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers", "report_to", "run_name",
    "resume_from_checkpoint", "remove_unused_columns", "push_to_hub", "hub_model_id", "load_best_model_at_end",
    "metric_for_best_model", "greater_is_better", "predict_with_generate", "generation_max_length",
    "generation_num_beams", "torch_compile", "use_liger_kernel", "group_by_length", "label_smoothing_factor",
    "local_rank", "disable_tqdm", "include_num_input_tokens_seen", "average_tokens_across_devices", "use_cpu",
    "accelerator_config", "neftune_noise_alpha", "torch_empty_cache_steps", "auto_find_batch_size",
})

# Keys read into the TrainSetup (or checked): everything else is either silent (no effect on memory) or warned about.
SETUP_KEYS = frozenset({
    "model_name_or_path", "stage", "finetuning_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_target",
    "use_dora", "freeze_trainable_layers", "freeze_vision_tower", "freeze_multi_modal_projector",
    "freeze_language_model", "train_mm_proj_only", "image_max_pixels", "image_min_pixels", "image_resolution",
    "video_max_pixels", "video_min_pixels", "video_resolution", "video_fps", "video_maxlen", "cutoff_len", "packing",
    "neat_packing", "quantization_bit", "quantization_method", "quantization_type", "double_quantization",
    "quantization_device_map", "pure_bf16", "bf16", "fp16", "optim", "flash_attn", "disable_gradient_checkpointing",
    "gradient_checkpointing", "per_device_train_batch_size", "gradient_accumulation_steps", "max_grad_norm",
    "deepspeed", "fsdp", "enable_liger_kernel", "use_liger_kernel", "additional_target", "use_reentrant_gc",
    "use_unsloth_gc", "oft_rank", "oft_block_size", "module_dropout", "oft_target", "pref_beta", "pref_ftx",
    "pref_loss", "ref_model", "ld_alpha", "kto_chosen_weight", "kto_rejected_weight",
})
# Keys that change memory in ways vlplan does not model, with what the estimate then means (a warning each when set
# to anything but its default).
NOT_MODELLED = {
    "use_unsloth": "unsloth's patched kernels are not modelled (LLaMA-Factory applies them to text LLMs only)",
    "shift_attn": "LongLoRA shift short attention is not modelled",
    "upcast_layernorm": "fp32 layer norms are not modelled (a few MiB of weights)",
    "upcast_lmhead_output": "the fp32 lm_head output (a second logits tensor in fp32) is not modelled; the "
                            "estimate is low by about seq_len x vocab x 4 bytes",
    "mixture_of_depths": "mixture-of-depths is not modelled",
    "rope_scaling": "RoPE scaling does not change memory at the same seq_len; ignored",
    "use_galore": "GaLore's projected optimizer states are not modelled; the estimate uses the `optim` optimizer",
    "use_apollo": "APOLLO's optimizer is not modelled; the estimate uses the `optim` optimizer",
    "use_badam": "BAdam (one block trainable at a time) is not modelled; the estimate trains every selected "
                 "parameter at once (an upper bound)",
    "use_adam_mini": "Adam-mini's reduced second moments are not modelled; the estimate uses the `optim` optimizer",
    "use_muon": "the Muon optimizer is not modelled; the estimate uses the `optim` optimizer",
    "use_llama_pro": "LLaMA Pro block expansion is not modelled",
    "freeze_extra_modules": "extra trainable modules (freeze_extra_modules) are not modelled",
    "pissa_init": "PiSSA's initialisation (an SVD at load) is not modelled; training memory is LoRA's",
    "image_do_pan_and_scan": "Gemma 3 pan & scan follows the registry's processor setting, not this key",
    "crop_to_patches": "InternVL crop_to_patches follows the registry's processor setting, not this key",
    "torch_compile": "torch.compile is not modelled (it usually lowers activation memory)",
    "fp8": "FP8 training is not modelled; the estimate is for bf16",
    "use_mca": "Megatron (mcore_adapter) training is not modelled",
    "use_kt": "KTransformers training is not modelled",
    "train_from_scratch": None,  # same memory as fine-tuning
    "use_rslora": None,
}

# HF `optim` names -> vlplan optimizers (planner/setup.py OPTIMIZERS). Exact equivalents; other names get the closest
# one with a warning.
OPTIM_FROM_HF = {
    "adamw_torch_fused": "adamw", "adamw_torch": "adamw-foreach", "adamw_hf": "adamw-foreach",
    "adamw_bnb_8bit": "adamw-8bit", "adamw_8bit": "adamw-8bit", "paged_adamw_8bit": "paged-adamw-8bit",
    "sgd": "sgd", "adafactor": "adafactor",
}

# v0.9.0 wrote image_resolution as the longest side (default 512), v0.9.1 as pixels (512 * 512); a value at or below
# this bound is read as a side length
_SIDE_LENGTH_MAX = 8192


def load_yaml(path: str | Path) -> dict:
    """A training YAML as a dict; a missing file, bad YAML or a non-mapping is a one-line VlplanError."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise VlplanError(f"LLaMA-Factory config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise VlplanError(f"{path}: not valid YAML ({problem}{where})") from None
    except UnicodeDecodeError:
        raise VlplanError(f"{path}: not a UTF-8 text file") from None
    if data is None:
        raise VlplanError(f"{path} is empty; a LLaMA-Factory training config is a YAML mapping of keys")
    if not isinstance(data, dict):
        raise VlplanError(f"{path}: a LLaMA-Factory training config is a YAML mapping of keys, got a "
                          f"{type(data).__name__}")
    return data


def detect_version(config: dict) -> tuple[str, str]:
    """The LLaMA-Factory version a YAML is written for, judged from its keys (and why)."""
    resolution = config.get("image_resolution")
    if isinstance(resolution, int) and not isinstance(resolution, bool) and resolution <= _SIDE_LENGTH_MAX:
        return "0.9.0", f"image_resolution {resolution} is a side length (v0.9.0)"
    for key in ("image_resolution", "video_resolution", "train_mm_proj_only"):
        if key in config:
            return "0.9.1", f"{key} was replaced after v0.9.1"
    if config.get("quantization_method") == "bitsandbytes":
        return "0.9.2", "quantization_method 'bitsandbytes' was renamed 'bnb' in v0.9.3"
    return "latest", "current key names"


class _Reader:
    """Typed access to one YAML's keys with LLaMA-Factory's defaults and one-line errors."""

    def __init__(self, config: dict, name: str):
        self.config, self.name = config, name

    def bool(self, key: str, default: bool) -> bool:
        value = self.config.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise VlplanError(f"{self.name}: {key} must be true or false, got {value!r}")
        return value

    def int(self, key: str, default, *, minimum: int = 1):
        value = self.config.get(key, default)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise VlplanError(f"{self.name}: {key} must be an integer, got {value!r}")
        if value < minimum:
            raise VlplanError(f"{self.name}: {key} must be at least {minimum}, got {value}")
        return value

    def float(self, key: str, default: float, *, minimum: float = 0.0, below: float | None = None) -> float:
        value = self.config.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise VlplanError(f"{self.name}: {key} must be a number, got {value!r}")
        if value < minimum or (below is not None and value >= below):
            bound = f"in [{minimum}, {below})" if below is not None else f"at least {minimum}"
            raise VlplanError(f"{self.name}: {key} must be {bound}, got {value}")
        return float(value)

    def choice(self, key: str, default: str, choices) -> str:
        value = self.config.get(key, default)
        if value is None:
            return default
        if not isinstance(value, str) or value not in choices:
            raise VlplanError(f"{self.name}: {key} {value!r} is not one of {', '.join(choices)}")
        return value


def llamafactory_choices(source: str | Path | dict, *, version: str | None = None,
                         base_dir: str | Path | None = None, read_deepspeed_key: bool = True
                         ) -> tuple[dict, list[str]]:
    """The `make_setup` arguments a LLaMA-Factory YAML (path or dict) asks for, and warnings.

    `version` forces the LLaMA-Factory version whose defaults fill missing keys (default: detected from the keys).
    `base_dir` is where a relative `deepspeed:` path is looked up besides the working directory (default: the YAML's
    folder and its parents, since LLaMA-Factory runs from its repository root). `read_deepspeed_key=False` skips
    the `deepspeed:` key (a --deepspeed file replaces it).
    """
    if isinstance(source, dict):
        config, name, yaml_dir = dict(source), "llamafactory config", None
    else:
        config, name, yaml_dir = load_yaml(source), str(source), Path(source).resolve().parent
    r = _Reader(config, name)
    warnings: list[str] = []
    detected, why = detect_version(config)
    version = check_version(version) if version else detected
    old = _version_key(version) <= (0, 9, 1)
    if version != "latest":
        warnings.append(f"{name}: read as LLaMA-Factory v{version} ({why}); missing keys take that version's "
                        "defaults")
    # LLaMA-Factory prepares the model its own way (patch_model before init_adapter): plan for that stack
    choices: dict = {"stack": "llamafactory"}

    model = config.get("model_name_or_path")
    if model is not None:
        if not isinstance(model, str) or not model.strip():
            raise VlplanError(f"{name}: model_name_or_path must be a model name or path, got {model!r}")
        choices["model"] = model

    # Stage and method ------------------------------------------------------------------------------------------------
    stage = r.choice("stage", "sft", ("pt", "sft", "rm", "ppo", "dpo", "kto"))
    if stage in ("rm", "ppo"):
        raise VlplanError(f"{name}: stage {stage} is not modelled (vlplan models sft, pt, kto and dpo with pref_loss "
                          "sigmoid, orpo or simpo)")
    if stage == "dpo":  # hparams/finetuning_args.py RLHFArguments (pref_beta 0.1, pref_ftx 0.0, pref_loss sigmoid)
        choices.update(stage="dpo", pref_beta=r.float("pref_beta", 0.1), pref_ftx=r.float("pref_ftx", 0.0),
                       pref_loss=r.choice("pref_loss", "sigmoid",
                                          ("sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo")))
        if (config.get("ld_alpha") or None) is not None:
            raise VlplanError(f"{name}: ld_alpha (LD-DPO's length masks in get_batch_logps) is not modelled; drop it")
    if stage == "kto":  # RLHFArguments (kto_chosen_weight, kto_rejected_weight 1.0); CustomKTOTrainer: no pref_loss
        choices.update(stage="kto", pref_beta=r.float("pref_beta", 0.1), pref_ftx=r.float("pref_ftx", 0.0),
                       kto_chosen_weight=r.float("kto_chosen_weight", 1.0),
                       kto_rejected_weight=r.float("kto_rejected_weight", 1.0))
        if config.get("pref_loss", "sigmoid") not in (None, "sigmoid"):
            warnings.append(f"{name}: pref_loss {config['pref_loss']!r} is a DPO loss; LLaMA-Factory's KTO trainer "
                            "does not read it")
    if stage in ("dpo", "kto") and config.get("ref_model") is not None:
        raise VlplanError(f"{name}: ref_model (a separate reference model) is not modelled; vlplan models the "
                          "model itself as the reference (adapters disabled for LoRA); drop ref_model")
    finetuning = r.choice("finetuning_type", "lora", ("lora", "oft", "freeze", "full"))
    if finetuning == "oft" and _version_key(version) < (0, 9, 4):
        raise VlplanError(f"{name}: finetuning_type oft came with LLaMA-Factory v0.9.4; this file reads as "
                          f"v{version}")
    quant_bits = None
    if config.get("quantization_bit") is not None:
        quant_bits = r.int("quantization_bit", None)
        if finetuning == "oft":
            raise VlplanError(f"{name}: quantization_bit with finetuning_type oft (quantized OFT) is not modelled; "
                              "drop quantization_bit or use finetuning_type lora")
        if finetuning != "lora":
            raise VlplanError(f"{name}: quantization_bit needs finetuning_type lora (LLaMA-Factory: 'Quantization is "
                              f"only compatible with the LoRA or OFT method.'), got {finetuning}")
        if quant_bits not in (4, 8):
            raise VlplanError(f"{name}: quantization_bit {quant_bits} is not modelled; vlplan models 4- and 8-bit "
                              "bitsandbytes QLoRA")
        methods = QUANTIZATION_METHODS_OLD if version in ("0.9.0", "0.9.1", "0.9.2") else QUANTIZATION_METHODS
        default_method = "bitsandbytes" if methods is QUANTIZATION_METHODS_OLD else "bnb"
        qmethod = r.choice("quantization_method", default_method, tuple(dict.fromkeys(methods + ("bitsandbytes",))))
        if qmethod in ("hqq", "eetq"):
            warnings.append(f"{name}: quantization_method {qmethod} is modelled as bitsandbytes {quant_bits}-bit "
                            "(similar weight bytes, different kernels)")
        elif qmethod not in ("bnb", "bitsandbytes"):
            raise VlplanError(f"{name}: quantization_method {qmethod} is a pre-quantized checkpoint format, not "
                              "on-the-fly quantization; vlplan models bitsandbytes (bnb) 4/8-bit")
        if quant_bits == 4 and not r.bool("double_quantization", True):
            warnings.append(f"{name}: double_quantization false is modelled with double quantization (the fp32 "
                            "absmax constants add about 0.4 bit per weight: the estimate is slightly low)")
        r.choice("quantization_type", "nf4", ("fp4", "nf4"))
        if config.get("quantization_device_map") is not None:
            raise VlplanError(f"{name}: quantization_device_map must stay unset for training (LLaMA-Factory: 'Cannot "
                              "use device map for quantized models in training.')")
    else:
        unused = [key for key in ("quantization_method", "quantization_type", "double_quantization",
                                  "quantization_device_map") if config.get(key) is not None]
        if unused:
            warnings.append(f"{name}: {', '.join(unused)} only apply with quantization_bit; ignored")
    method = {"lora": "qlora" if quant_bits else "lora", "oft": "oft", "freeze": "freeze", "full": "full"}[finetuning]
    choices["method"] = method
    if quant_bits:
        choices["quant_bits"] = quant_bits

    # Which components train ------------------------------------------------------------------------------------------
    freeze_vision = r.bool("freeze_vision_tower", True)
    freeze_projector = r.bool("freeze_multi_modal_projector", True)
    freeze_language = r.bool("freeze_language_model", False)
    if r.bool("train_mm_proj_only", False):
        # v0.9.1 finetuning_args.py: freeze_vision_tower = freeze_vision_tower or train_mm_proj_only; language frozen
        if finetuning != "full":
            raise VlplanError(f"{name}: train_mm_proj_only is only valid for full training (LLaMA-Factory v0.9.1); "
                              f"got finetuning_type {finetuning}")
        freeze_vision, freeze_projector, freeze_language = True, False, True
    elif old and finetuning in ("full", "freeze") and "freeze_multi_modal_projector" not in config:
        warnings.append(f"{name}: LLaMA-Factory v{version} trained the projector of LLaVA-style models in "
                        f"{finetuning} tuning (it had no freeze_multi_modal_projector); modelled frozen as in later "
                        "versions")
    train_projector = not freeze_projector
    if finetuning in ("lora", "oft"):
        # LoRA (and OFT, which adapter.py sets up in the same `_setup_lora_tuning`): peft freezes every non-adapter weight and lora_target all skips the projector
        # (model_utils/misc.py::find_all_linear_modules), so the projector trains only when additional_target names
        # it (peft modules_to_save: a trainable full copy)
        extra = _lora_target(config.get("additional_target") or "none", name).split(",")
        in_extra = projector_key_in(extra, choices.get("model"))
        if train_projector and not in_extra:
            warnings.append(f"{name}: freeze_multi_modal_projector false has no effect with LoRA unless "
                            "additional_target names the projector; modelled frozen")
        train_projector = in_extra
        others = [t for t in extra if t != "none" and not projector_key_in([t], choices.get("model"))]
        if others:
            warnings.append(f"{name}: additional_target {','.join(others)}: extra fully trained modules are not "
                            "modelled")
    elif config.get("additional_target"):
        warnings.append(f"{name}: additional_target is only used by LoRA; ignored")
    choices.update(train_vision=not freeze_vision, train_projector=train_projector, freeze_llm=freeze_language)

    if finetuning == "lora":
        rank = r.int("lora_rank", 8)
        # lora_alpha None: make_setup's 2 * rank (FinetuningArguments: lora_alpha or lora_rank * 2), so that a
        # --lora-rank override keeps LLaMA-Factory's default ratio
        choices.update(lora_rank=rank, lora_alpha=r.int("lora_alpha", None),
                       lora_dropout=r.float("lora_dropout", 0.0, below=1.0), dora=r.bool("use_dora", False),
                       lora_target=_lora_target(config.get("lora_target", "all"), name))
    if finetuning == "oft":
        # adapter.py `_setup_lora_tuning`: OFTConfig(r=oft_rank, oft_block_size=oft_block_size,
        # target_modules=<lora_target>, module_dropout=module_dropout); `oft_target` is split but never read
        choices.update(oft_rank=r.int("oft_rank", 0, minimum=0),
                       oft_block_size=r.int("oft_block_size", 32, minimum=0),
                       module_dropout=r.float("module_dropout", 0.0, below=1.0),
                       lora_target=_lora_target(config.get("lora_target", "all"), name))
        if config.get("oft_target", "all") not in ("all", None):
            warnings.append(f"{name}: oft_target {config['oft_target']!r} is not read by LLaMA-Factory (adapter.py "
                            "builds OFT's target modules from lora_target); modelled with lora_target")
        for key in ("lora_rank", "lora_alpha", "lora_dropout", "use_dora"):
            if config.get(key) not in (None, False):
                warnings.append(f"{name}: {key} is a LoRA setting; finetuning_type oft does not read it")
    if finetuning == "freeze":
        layers = config.get("freeze_trainable_layers", 2)
        if isinstance(layers, bool) or not isinstance(layers, int) or layers == 0:
            raise VlplanError(f"{name}: freeze_trainable_layers must be a non-zero integer, got {layers!r}")
        if layers < 0:
            warnings.append(f"{name}: freeze_trainable_layers {layers} trains the first {-layers} layers; modelled as "
                            f"the last {-layers} (same parameters, but backward then runs through every layer: the "
                            "estimate is low)")
        choices["freeze_trainable_layers"] = abs(layers)
        modules = config.get("freeze_trainable_modules", "all")
        if modules not in ("all", None):
            warnings.append(f"{name}: freeze_trainable_modules {modules!r} is modelled as all modules of the "
                            "trainable layers (an upper bound)")

    # Images, videos and sequence -------------------------------------------------------------------------------------
    choices.update(_processor(config, r, version, warnings, name))
    cutoff = r.int("cutoff_len", 1024 if version == "0.9.0" else 2048)
    neat = r.bool("neat_packing", False)
    packing = config.get("packing")
    if packing is None:
        packing = stage == "pt"  # get_train_args: packing = packing if not None else stage == "pt"
    elif not isinstance(packing, bool):
        raise VlplanError(f"{name}: packing must be true or false, got {packing!r}")
    packing = packing or neat  # DataArguments.__post_init__: `if self.neat_packing: self.packing = True`
    # DataArguments.__post_init__ lowers cutoff_len by one with packing, and PackedSupervisedDatasetProcessor pads
    # every row to that + 1: a packed row holds exactly the YAML's cutoff_len tokens (planner/packing.py)
    choices.update(seq_len=cutoff, packing=packing, neat_packing=neat)
    if packing and cutoff < 2:
        raise VlplanError(f"{name}: cutoff_len must be at least 2 with packing, got {cutoff}")

    # Precision, optimizer, kernels, checkpointing ----------------------------------------------------------------
    bf16, fp16, pure_bf16 = r.bool("bf16", False), r.bool("fp16", False), r.bool("pure_bf16", False)
    if bf16 and fp16:
        raise VlplanError(f"{name}: bf16 and fp16 are both true; choose one")
    if pure_bf16:
        precision = "pure-bf16"
    elif bf16:
        precision = "bf16"
    elif fp16:
        precision = "fp16"
    else:
        precision = "bf16"
        warnings.append(f"{name}: neither bf16 nor fp16 is set: LLaMA-Factory loads the checkpoint dtype (bf16 on "
                        "bf16 GPUs) without autocast and warns 'We recommend enable mixed precision training'; "
                        "modelled as bf16")
    choices["precision"] = precision
    choices["optimizer"] = _optimizer(config.get("optim"), name, warnings)
    flash = r.choice("flash_attn", "auto", tuple(FLASH_ATTN))
    if flash == "fa3":
        warnings.append(f"{name}: flash_attn fa3 is modelled as FlashAttention-2 (same memory)")
    choices["attn"] = FLASH_ATTN[flash]
    # LLaMA-Factory turns checkpointing on itself unless disable_gradient_checkpointing; an explicit HF
    # gradient_checkpointing: true makes the Trainer enable it regardless
    choices["gradient_checkpointing"] = (not r.bool("disable_gradient_checkpointing", False)
                                         or r.bool("gradient_checkpointing", False))
    # use_unsloth_gc: checkpointed layers' inputs in host RAM (checkpointing.py get_unsloth_gradient_checkpointing_func)
    choices["offload_checkpoints"] = r.bool("use_unsloth_gc", False) and choices["gradient_checkpointing"]
    if r.bool("use_unsloth_gc", False) and not choices["gradient_checkpointing"]:
        warnings.append(f"{name}: use_unsloth_gc offloads checkpointed inputs, but checkpointing is disabled: no "
                        "effect")
    if r.bool("use_reentrant_gc", True) is False and choices["gradient_checkpointing"]:
        warnings.append(f"{name}: use_reentrant_gc false (non-reentrant checkpointing under LLaMA-Factory's stack) is "
                        "not modelled; the estimate uses LLaMA-Factory's default reentrant checkpointing")
    if config.get("gradient_checkpointing") is False and choices["gradient_checkpointing"]:
        warnings.append(f"{name}: gradient_checkpointing false does not switch checkpointing off: LLaMA-Factory "
                        "enables it itself (prepare_model_for_training); modelled on, set "
                        "disable_gradient_checkpointing: true to train without it")
    liger = r.bool("enable_liger_kernel", False) or r.bool("use_liger_kernel", False)
    if liger:  # modelled per family (planner/memory/liger.py); where it is not, setup_warnings says so
        if "use_liger_kernel" in config and "enable_liger_kernel" not in config:
            warnings.append(f"{name}: use_liger_kernel is the HF Trainer's switch; LLaMA-Factory's is "
                            "enable_liger_kernel")
    choices["liger_kernel"] = liger

    # Batch and distribution ------------------------------------------------------------------------------------------
    if "per_device_train_batch_size" not in config:
        warnings.append(f"{name}: per_device_train_batch_size is missing: HF TrainingArguments' default 8 applies "
                        "(every LLaMA-Factory example sets 1)")
    choices["batch_size"] = r.int("per_device_train_batch_size", 8)
    choices["gradient_accumulation_steps"] = r.int("gradient_accumulation_steps", 1)
    choices["max_grad_norm"] = r.float("max_grad_norm", 1.0)
    if config.get("deepspeed") is not None and read_deepspeed_key:
        ds, ds_warnings = _deepspeed(config["deepspeed"], name, yaml_dir, base_dir)
        warnings += ds_warnings
        warnings += deepspeed_consistency(ds, choices, name)
        choices.update(ds.setup_fields())
    elif config.get("fsdp"):
        choices.update(_fsdp(config["fsdp"], name, warnings, config.get("fsdp_config")))

    warnings += _unread_keys(config, version, name)
    return choices, warnings


# LLaMA-Factory's projector module per model_type (model/model_utils/visual.py `_register_composite_model`
# projector_keys; default "multi_modal_projector"), for additional_target
PROJECTOR_KEYS = {"qwen2_vl": "visual.merger", "qwen2_5_vl": "visual.merger", "qwen3_vl": "visual.merger",
                  "qwen3_vl_moe": "visual.merger", "minicpmv": "resampler"}


def projector_key(family: str) -> str:
    return PROJECTOR_KEYS.get(family, "multi_modal_projector")


def projector_key_in(targets: list[str], model) -> bool:
    """Whether additional_target names the model's projector (peft matches module-name suffixes)."""
    if model is None:
        keys = set(PROJECTOR_KEYS.values()) | {"multi_modal_projector"}
    else:
        from ..registry import resolve

        spec = resolve(model) if isinstance(model, str) else model
        keys = {projector_key(spec.family)}
    return any(t in keys or any(k.endswith("." + t) for k in keys) for t in targets)


def _lora_target(value, name: str) -> str:
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if not isinstance(value, str) or not value.strip():
        raise VlplanError(f"{name}: lora_target must be all or comma-separated module names, got {value!r}")
    return ",".join(t.strip() for t in value.split(",") if t.strip())


def _processor(config: dict, r: _Reader, version: str, warnings: list[str], name: str) -> dict:
    out: dict = {}
    old = _version_key(version) <= (0, 9, 1)
    if "image_max_pixels" in config:
        out["image_max_pixels"] = r.int("image_max_pixels", None)
        if "image_resolution" in config:
            warnings.append(f"{name}: both image_resolution and image_max_pixels are set; image_max_pixels wins")
    elif "image_resolution" in config:
        resolution = r.int("image_resolution", None)
        if resolution <= _SIDE_LENGTH_MAX:
            warnings.append(f"{name}: image_resolution {resolution} (v0.9.0) caps the longer side; modelled as "
                            f"image_max_pixels {resolution}x{resolution} (exact for square images, more tokens "
                            "otherwise)")
            resolution = resolution * resolution
        out["image_max_pixels"] = resolution
    else:
        # v0.9.0: image_resolution 512 (side), v0.9.1: 512 * 512 pixels, later image_max_pixels 768 * 768
        out["image_max_pixels"] = 512 * 512 if old else 768 * 768
    # image_min_pixels arrived in v0.9.2; before it there was no floor
    default_min = None if old else 32 * 32
    out["image_min_pixels"] = r.int("image_min_pixels", default_min)
    if out["image_min_pixels"] is not None and out["image_min_pixels"] > out["image_max_pixels"]:
        raise VlplanError(f"{name}: image_max_pixels cannot be smaller than image_min_pixels "
                          f"({out['image_max_pixels']} < {out['image_min_pixels']})")
    video_default = 128 * 128 if old else 256 * 256
    if "video_resolution" in config and "video_max_pixels" not in config:
        video = r.int("video_resolution", video_default)
        out["video_max_pixels"] = video * video if video <= _SIDE_LENGTH_MAX else video
    else:
        out["video_max_pixels"] = r.int("video_max_pixels", video_default)
    out["video_min_pixels"] = r.int("video_min_pixels", 16 * 16)
    out["video_fps"] = r.float("video_fps", 2.0)
    if out["video_fps"] <= 0:
        raise VlplanError(f"{name}: video_fps must be positive, got {out['video_fps']}")
    out["video_maxlen"] = r.int("video_maxlen", 64 if old else 128)
    return out


def _optimizer(value, name: str, warnings: list[str]) -> str:
    if value is None:
        # transformers' default: adamw_torch_fused with torch >= 2.8 (adamw_torch before; same states)
        return "adamw"
    if not isinstance(value, str):
        raise VlplanError(f"{name}: optim must be an HF optimizer name such as adamw_torch, got {value!r}")
    if value in OPTIM_FROM_HF:
        return OPTIM_FROM_HF[value]
    lowered = value.lower()
    if "8bit" in lowered:
        closest = "paged-adamw-8bit" if "paged" in lowered else "adamw-8bit"
    elif lowered.startswith(("galore", "apollo", "grokadamw", "schedule_free", "lomo", "adalomo")):
        closest = "adamw"
    elif lowered in ("rmsprop", "lion_32bit", "paged_lion_32bit", "adamw_torch_npu_fused", "adamw_torch_xla",
                     "adamw_apex_fused", "adamw_anyprecision", "paged_adamw_32bit", "adamw_torch_4bit", "ademamix",
                     "paged_ademamix_32bit", "stable_adamw", "adamw_torch_8bit"):
        closest = "adamw"
    else:
        raise VlplanError(f"{name}: optim {value!r} is not an optimizer vlplan knows; use one of "
                          f"{', '.join(OPTIM_FROM_HF)}")
    warnings.append(f"{name}: optim {value} is modelled as {closest} ({HF_OPTIM[closest]}), the closest in "
                    "optimizer-state bytes")
    return closest


def resolve_deepspeed_path(value: str, yaml_dir: Path | None, base_dir: str | Path | None) -> Path | None:
    """The file a `deepspeed:` path names: as given (LLaMA-Factory runs from its repository root), then beside the
    YAML and up to three folders above it (examples/train_lora/x.yaml -> examples/deepspeed/...)."""
    path = Path(value).expanduser()
    candidates = [path]
    if not path.is_absolute():
        for folder in [Path(base_dir)] if base_dir else []:
            candidates.append(folder / path)
        if yaml_dir is not None:
            candidates += [yaml_dir / path] + [parent / path for parent in list(yaml_dir.parents)[:3]]
    return next((c for c in candidates if c.is_file()), None)


def _deepspeed(value, name: str, yaml_dir: Path | None, base_dir) -> tuple[DeepSpeedSettings, list[str]]:
    if isinstance(value, dict):
        return read_deepspeed(value)
    if not isinstance(value, str) or not value.strip():
        raise VlplanError(f"{name}: deepspeed must be a path to a DeepSpeed JSON config, got {value!r}")
    found = resolve_deepspeed_path(value, yaml_dir, base_dir)
    if found is not None:
        return read_deepspeed(found)
    return deepspeed_from_name(value)


def deepspeed_consistency(ds: DeepSpeedSettings, choices: dict, name: str) -> list[str]:
    """Warnings where a DeepSpeed config pins a number the training arguments set differently (the HF Trainer then
    stops with 'Please correct the following DeepSpeed config values that mismatch TrainingArguments values')."""
    warnings = []
    for ds_value, key, label in ((ds.micro_batch_size, "batch_size", "train_micro_batch_size_per_gpu"),
                                 (ds.gradient_accumulation_steps, "gradient_accumulation_steps",
                                  "gradient_accumulation_steps"),
                                 (ds.gradient_clipping, "max_grad_norm", "gradient_clipping")):
        if ds_value is not None and key in choices and ds_value != choices[key]:
            warnings.append(f"{name}: DeepSpeed {label} {ds_value} differs from the training arguments' "
                            f"{choices[key]}; the HF Trainer refuses the mismatch (vlplan uses {choices[key]})")
    precision = choices.get("precision")
    if precision is not None:
        wants_bf16 = precision in ("bf16", "pure-bf16")
        wants_fp16 = precision == "fp16"
        if (ds.bf16 is not None and ds.bf16 != wants_bf16) or (ds.fp16 is not None and ds.fp16 != wants_fp16):
            warnings.append(f"{name}: the DeepSpeed config's bf16/fp16 'enabled' values contradict precision "
                            f"{precision}; set them to \"auto\"")
    return warnings


def _fsdp(value, name: str, warnings: list[str], fsdp_config=None) -> dict:
    """The HF Trainer's `fsdp` option (TrainingArguments FSDPOption: full_shard | shard_grad_op | hybrid_shard |
    hybrid_shard_zero2 | no_shard, with offload and auto_wrap) as an FSDP setup. The Trainer runs FSDP version 1
    unless `fsdp_config` says version 2; version 1 is estimated as FSDP2's strategy of the same name."""
    options = value.split() if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else []
    strategies = {"full_shard": "full_shard", "shard_grad_op": "shard_grad_op", "hybrid_shard": "hybrid_shard",
                  "hybrid_shard_zero2": "hybrid_shard", "no_shard": "no_shard"}
    named = [o for o in options if o in strategies]
    if not named:
        warnings.append(f"{name}: fsdp {value!r} names no sharding strategy; the estimate assumes DDP")
        return {}
    out = {"sharding": "fsdp", "fsdp": strategies[named[0]], "zero": 0,
           "offload": "all" if "offload" in options else "none"}
    version = None
    if isinstance(fsdp_config, dict):
        version = fsdp_config.get("version", fsdp_config.get("fsdp_version"))
    elif fsdp_config is not None:
        warnings.append(f"{name}: fsdp_config {fsdp_config!r} is a file vlplan does not read; FSDP version 1 is "
                        "assumed")
    if str(version) != "2":
        warnings.append(f"{name}: FSDP version 1 ({' '.join(options)}) is estimated as FSDP2's {out['fsdp']} (the "
                        "same units and sharding; FSDP1's flat-parameter buffers are not modelled apart)")
    if named[0] == "hybrid_shard_zero2":
        warnings.append(f"{name}: hybrid_shard_zero2 keeps parameters unsharded after forward within a node; it is "
                        "estimated as hybrid_shard (resharded): an underestimate")
    return out


def _unread_keys(config: dict, version: str, name: str) -> list[str]:
    warnings = []
    known = llamafactory_keys("latest") | VERSIONED_KEYS.keys() | COMMON_TRAINING_ARGUMENTS
    accepted = llamafactory_keys(version)
    for key, value in config.items():
        if key in SETUP_KEYS:
            if key in VERSIONED_KEYS and key not in accepted:
                warnings.append(f"{name}: {key} is not a key of LLaMA-Factory v{version} (read anyway)")
            continue
        if key in NOT_MODELLED:
            if NOT_MODELLED[key] and value not in (None, False, 0, "", "none"):
                warnings.append(f"{name}: {key}: {NOT_MODELLED[key]}")
        elif key not in known:
            warnings.append(f"{name}: unknown key {key!r} ignored (LLaMA-Factory rejects keys outside its arguments "
                            "and TrainingArguments unless ALLOW_EXTRA_ARGS=1)")
    return warnings


def build_setup(choices: dict) -> TrainSetup:
    """`make_setup` on a choices dict whose `model` is a name/path (resolved through the registry) or a ModelSpec."""
    from ..registry import resolve

    choices = dict(choices)
    model = choices.pop("model", None)
    if model is None:
        raise VlplanError("no model: the config has no model_name_or_path; add it or pass --model")
    spec = resolve(model) if isinstance(model, str) else model
    return make_setup(spec, **choices)


def setup_from_llamafactory(source: str | Path | dict, *, version: str | None = None, **overrides
                            ) -> tuple[TrainSetup, list[str]]:
    """The TrainSetup of a LLaMA-Factory training YAML (path or dict), and warnings for what it does not model.

    `overrides` are `make_setup` arguments that win over the YAML (images, gpu, num_gpus, model, method, ...).
    """
    choices, warnings = llamafactory_choices(source, version=version)
    choices.update(overrides)
    return build_setup(choices), warnings


# Export ---------------------------------------------------------------------------------------------------------------
def llamafactory_yaml(setup: TrainSetup, *, version: str = "latest", model_name_or_path: str | None = None,
                      deepspeed_path: str | None = None, extra: dict | None = None) -> dict:
    """A LLaMA-Factory training YAML (as a dict) for `setup`, with only keys `version` accepts.

    Every memory-relevant key is written out, defaults included, so the file means the same under any version's
    defaults; `per_device_train_batch_size` is always there (HF's default is 8). `deepspeed_path` is the file name
    the `deepspeed:` key points at when ZeRO is on (write it with `deepspeed.deepspeed_config`). `extra` adds the
    keys a run needs beyond memory (dataset, template, output_dir, learning_rate...).
    """
    check_version(version)
    v = _version_key(version)
    old = v <= (0, 9, 1)
    out: dict = {"model_name_or_path": model_name_or_path or setup.model.hf_id, "trust_remote_code": True}
    if setup.image_max_pixels is None:
        raise VlplanError("the setup has no image_max_pixels cap, which LLaMA-Factory always applies (default "
                          "589824); set one")
    if version == "0.9.0":
        out["image_resolution"] = math.isqrt(setup.image_max_pixels)
        if out["image_resolution"] ** 2 != setup.image_max_pixels:
            raise VlplanError(f"LLaMA-Factory v0.9.0 caps the image side; image_max_pixels {setup.image_max_pixels} "
                              "is not a square number")
    elif old:
        out["image_resolution"] = setup.image_max_pixels
    else:
        out["image_max_pixels"] = setup.image_max_pixels
        if setup.image_min_pixels is not None:
            out["image_min_pixels"] = setup.image_min_pixels
    if old:
        out["video_resolution"] = (math.isqrt(setup.video_max_pixels) if version == "0.9.0"
                                   else setup.video_max_pixels)
    else:
        out.update(video_max_pixels=setup.video_max_pixels, video_min_pixels=setup.video_min_pixels)
    out.update(video_fps=setup.video_fps, video_maxlen=setup.video_maxlen)

    out.update(stage=setup.stage, do_train=True, finetuning_type={"qlora": "lora"}.get(setup.method, setup.method))
    if setup.stage == "dpo":
        out.update(pref_beta=setup.pref_beta, pref_ftx=setup.pref_ftx, pref_loss=setup.pref_loss)
    if setup.stage == "kto":
        out.update(pref_beta=setup.pref_beta, pref_ftx=setup.pref_ftx, kto_chosen_weight=setup.kto_chosen_weight,
                   kto_rejected_weight=setup.kto_rejected_weight)
    if setup.method == "oft" and v < (0, 9, 4):
        raise VlplanError(f"LLaMA-Factory v{version} cannot express finetuning_type oft (it came with v0.9.4); "
                          "export for v0.9.4 or later")
    if setup.method in ("lora", "qlora"):
        out.update(lora_rank=setup.lora.rank, lora_alpha=setup.lora.alpha, lora_dropout=setup.lora.dropout,
                   lora_target=",".join(setup.lora.targets), use_dora=setup.lora.dora)
    if setup.method == "oft":
        out.update(oft_rank=setup.oft.rank, oft_block_size=setup.oft.block_size,
                   module_dropout=setup.oft.module_dropout, lora_target=",".join(setup.lora.targets))
    if setup.method in ("lora", "qlora", "oft") and setup.projector is not Train.FROZEN:
        out["additional_target"] = projector_key(setup.model.family)
    if setup.method == "freeze":
        out["freeze_trainable_layers"] = setup.freeze_trainable_layers
    if setup.method in ("lora", "qlora", "oft") and setup.vision is Train.FULL:
        # finetuning_type lora puts adapters on an unfrozen vision tower (adapter.py find_all_linear_modules /
        # visual.py patch_target_modules); a full tower would need additional_target, peft's modules_to_save copy
        raise VlplanError("LLaMA-Factory cannot train the vision tower in full next to LoRA (freeze_vision_tower: "
                          "false gives it adapters); export --vision lora, or launch LoRA on the language model with a "
                          "full vision tower with ms-swift (lora_llm_full_vit)")
    out.update(_freeze_keys(setup, version))
    if setup.method == "qlora":
        out.update(quantization_bit=setup.quant_bits,
                   quantization_method="bitsandbytes" if v <= (0, 9, 2) else "bnb", double_quantization=True)

    out.update(cutoff_len=setup.seq_len, packing=setup.packing)
    if setup.neat_packing:
        out["neat_packing"] = True
    out.update(per_device_train_batch_size=setup.batch_size,
               gradient_accumulation_steps=setup.gradient_accumulation_steps, max_grad_norm=setup.max_grad_norm)
    if setup.precision == "fp32":
        raise VlplanError("LLaMA-Factory has no fp32 training mode (without bf16/fp16 it loads the checkpoint dtype); "
                          "use precision bf16 or fp16")
    out.update(bf16=setup.precision == "bf16", fp16=setup.precision == "fp16")
    if setup.precision == "pure-bf16":
        out["pure_bf16"] = True  # weights and trainable parameters stay bf16; no AMP (bf16 false keeps DeepSpeed so)
    out["optim"] = HF_OPTIM[setup.optimizer]
    out["flash_attn"] = {"sdpa": "sdpa", "eager": "disabled", "fa2": "fa2"}[setup.attn]
    if setup.vision_gradient_checkpointing is not None \
            and setup.vision_gradient_checkpointing != setup.gradient_checkpointing:
        raise VlplanError("LLaMA-Factory has no per-component checkpointing (disable_gradient_checkpointing switches "
                          "both towers); drop --vision-gradient-checkpointing to export, or launch with ms-swift "
                          "(vit_gradient_checkpointing)")
    out["disable_gradient_checkpointing"] = not setup.gradient_checkpointing
    if setup.offload_checkpoints:
        out["use_unsloth_gc"] = True
    if setup.liger_kernel:
        out["enable_liger_kernel"] = True
    if setup.sharding == "zero" and (setup.zero > 0 or setup.offload != "none"):
        out["deepspeed"] = deepspeed_path or default_deepspeed_name(setup)
    if extra:
        out.update(extra)
    return out


def default_deepspeed_name(setup: TrainSetup) -> str:
    """LLaMA-Factory's file name for the setup's stage and offload (ds_z3_offload_config.json); a name that
    `deepspeed_from_name` reads back the same when the file is missing."""
    return f"ds_z{setup.zero}{'_offload' if setup.offload != 'none' else ''}_config.json"


def _freeze_keys(setup: TrainSetup, version: str) -> dict:
    vision_frozen = setup.vision is Train.FROZEN
    projector_frozen = setup.projector is Train.FROZEN
    language_frozen = setup.language is Train.FROZEN
    if _version_key(version) > (0, 9, 1):
        return dict(freeze_vision_tower=vision_frozen, freeze_multi_modal_projector=projector_frozen,
                    freeze_language_model=language_frozen)
    # v0.9.1 has freeze_vision_tower and train_mm_proj_only (projector only, full) and nothing else
    if setup.method == "full" and vision_frozen and not projector_frozen and language_frozen:
        return dict(freeze_vision_tower=True, train_mm_proj_only=True)
    if (not projector_frozen and setup.method not in ("lora", "qlora")) or language_frozen:
        raise VlplanError(f"LLaMA-Factory v{version} cannot express this setup (projector {setup.projector.value}, "
                          f"language model {setup.language.value}); export for version 0.9.2 or later")
    return dict(freeze_vision_tower=vision_frozen, train_mm_proj_only=False)


# A training file that trains ------------------------------------------------------------------------------------------
# LLaMA-Factory's chat template per checkpoint: the `template=` of `register_model_group` in
# src/llamafactory/extras/constants.py of the llamafactory 0.9.5 wheel (DEFAULT_TEMPLATE, looked up by hub id).
# Checkpoints missing here have no template registered there (llava-llama-3, Idefics3, SmolVLM, Phi-3.5-vision).
LLAMAFACTORY_TEMPLATES = {
    "qwen/qwen2-vl-2b-instruct": "qwen2_vl", "qwen/qwen2-vl-7b-instruct": "qwen2_vl",
    "qwen/qwen2-vl-72b-instruct": "qwen2_vl", "qwen/qwen2.5-vl-3b-instruct": "qwen2_vl",
    "qwen/qwen2.5-vl-7b-instruct": "qwen2_vl", "qwen/qwen2.5-vl-32b-instruct": "qwen2_vl",
    "qwen/qwen2.5-vl-72b-instruct": "qwen2_vl", "qwen/qwen3-vl-4b-instruct": "qwen3_vl_nothink",
    "qwen/qwen3-vl-8b-instruct": "qwen3_vl_nothink", "qwen/qwen3-vl-32b-instruct": "qwen3_vl_nothink",
    "qwen/qwen3-vl-30b-a3b-instruct": "qwen3_vl_nothink", "llava-hf/llava-1.5-7b-hf": "llava",
    "llava-hf/llava-1.5-13b-hf": "llava", "mistral-community/pixtral-12b": "pixtral",
    "llava-hf/llava-v1.6-mistral-7b-hf": "llava_next_mistral", "llava-hf/llava-v1.6-vicuna-7b-hf": "llava_next",
    "opengvlab/internvl3-1b-hf": "intern_vl", "opengvlab/internvl3-2b-hf": "intern_vl",
    "opengvlab/internvl3-8b-hf": "intern_vl", "opengvlab/internvl3-38b-hf": "intern_vl",
    "google/gemma-3-4b-it": "gemma3", "google/gemma-3-12b-it": "gemma3", "google/gemma-3-27b-it": "gemma3",
    "meta-llama/llama-3.2-11b-vision-instruct": "mllama", "google/paligemma2-3b-pt-448": "paligemma",
    "google/paligemma2-10b-pt-448": "paligemma", "openbmb/minicpm-v-2_6": "minicpm_v",
}
# Other checkpoints (a local folder, another hub id) of families whose checkpoints all use one template
FAMILY_TEMPLATES = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl", "internvl": "intern_vl", "gemma3": "gemma3",
                    "mllama": "mllama", "paligemma": "paligemma", "minicpmv": "minicpm_v"}

FILL_IN = "FILL IN"  # the comment that marks a placeholder value
TEMPLATE_PLACEHOLDER = "FILL_IN_TEMPLATE"  # LLaMA-Factory stops on it: "Template FILL_IN_TEMPLATE does not exist."

# The run keys of LLaMA-Factory's own multimodal examples (examples/train_lora/qwen2_5vl_lora_sft.yaml and
# examples/train_full/qwen2_5vl_full_sft.yaml, hiyouga/LLaMA-Factory @ 85b0f312 / 30342065), less `max_samples: 1000`
# (a demo limit that would silently cut a real dataset): key -> (section, value, comment)
_RUN_KEYS = {
    "overwrite_cache": ("dataset", True, None),
    "preprocessing_num_workers": ("dataset", 16, None),
    "dataloader_num_workers": ("dataset", 4, None),
    "logging_steps": ("output", 10, None),
    "save_steps": ("output", 500, None),
    "plot_loss": ("output", True, None),
    "overwrite_output_dir": ("output", True, None),
    "save_only_model": ("output", False, None),
    "report_to": ("output", "none", "choices: [none, wandb, tensorboard, swanlab, mlflow]"),
    "lr_scheduler_type": ("train", "cosine", None),
    "ddp_timeout": ("train", 180000000, None),
    "resume_from_checkpoint": ("train", None, None),
}
_SECTIONS = ("model", "method", "dataset", "output", "train")
# keys that lead their section, as in LLaMA-Factory's examples; the others follow in the order written
_LEADING_KEYS = ("model_name_or_path", "trust_remote_code", "stage", "do_train", "finetuning_type", "dataset",
                 "dataset_dir", "template", "cutoff_len", "output_dir", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "learning_rate", "num_train_epochs", "lr_scheduler_type",
                 "warmup_steps", "warmup_ratio")
_SECTION_OF = {
    "model_name_or_path": "model", "trust_remote_code": "model", "image_max_pixels": "model",
    "image_min_pixels": "model", "image_resolution": "model", "video_max_pixels": "model",
    "video_min_pixels": "model", "video_resolution": "model", "video_fps": "model", "video_maxlen": "model",
    "quantization_bit": "model", "quantization_method": "model", "double_quantization": "model",
    "flash_attn": "model", "enable_liger_kernel": "model",
    "dataset": "dataset", "dataset_dir": "dataset", "template": "dataset", "cutoff_len": "dataset",
    "packing": "dataset", "neat_packing": "dataset", "output_dir": "output", "per_device_train_batch_size": "train",
    "gradient_accumulation_steps": "train", "learning_rate": "train", "num_train_epochs": "train",
    "max_grad_norm": "train", "bf16": "train", "fp16": "train", "pure_bf16": "train", "optim": "train",
    "disable_gradient_checkpointing": "train", "use_unsloth_gc": "model",
}
# Keys the plan decides even when it does not write them: a training YAML keeps none of them unless the export writes
# it (a `deepspeed:` file for another ZeRO stage, FSDP next to DeepSpeed, the HF Trainer's own checkpointing switch,
# quantization keys without QLoRA, pure_bf16 with another precision)
_PLAN_OWNED = frozenset({"deepspeed", "fsdp", "fsdp_config", "gradient_checkpointing", "quantization_bit",
                         "quantization_method", "double_quantization", "quantization_type", "pure_bf16",
                         "additional_target", "train_mm_proj_only", "freeze_vision_tower",
                         "freeze_multi_modal_projector", "freeze_language_model"})


def llamafactory_template(spec) -> str | None:
    """LLaMA-Factory's chat template for a model spec, or None where LLaMA-Factory registers none for it."""
    return LLAMAFACTORY_TEMPLATES.get(spec.hf_id.lower()) or FAMILY_TEMPLATES.get(spec.family)


def model_location(spec) -> str:
    """What `model_name_or_path` names: the folder of a local config.json the spec was read from, else its hub id."""
    source = Path(spec.source_url) if spec.source_url and "://" not in spec.source_url else None
    if source is not None and source.is_absolute() and source.is_file():
        return str(source.parent if source.name == "config.json" else source)
    return spec.hf_id


def _learning_rate(method: str) -> float:
    # LLaMA-Factory's examples: 1.0e-4 for LoRA / QLoRA / freeze (examples/train_lora, train_qlora, train_freeze),
    # 1.0e-5 for full (examples/train_full)
    return 1.0e-5 if method == "full" else 1.0e-4


class TrainingYaml:
    """A complete LLaMA-Factory training file: `config` (keys in order), a comment per key where useful, the
    section each key is printed under, and what the caller should tell the user (placeholders to fill, keys of the
    input file that the plan removed)."""

    def __init__(self):
        self.config: dict = {}
        self.comments: dict[str, str] = {}
        self.sections: dict[str, str] = {}
        self.placeholders: list[str] = []
        self.removed: list[str] = []

    def set(self, key: str, value, comment: str | None = None, section: str | None = None) -> None:
        self.config[key] = value
        if comment:
            self.comments[key] = comment
        if section:
            self.sections[key] = section

    def text(self, version: str = "latest") -> str:
        return dump_yaml(self.config, version, comments=self.comments, sections=self.sections or None,
                         placeholders=bool(self.placeholders))


def training_yaml(setup: TrainSetup, *, version: str = "latest", base: dict | None = None,
                  deepspeed_path: str | None = None, epochs: float | None = None) -> TrainingYaml:
    """The LLaMA-Factory training file for a planned `setup`: the memory keys of `llamafactory_yaml`, plus
    everything a run needs.

    With `base` (the input training YAML), every key of it that the plan does not decide is kept as it was (dataset,
    template, output_dir, learning rate, schedule, logging, saving, evaluation...), the keys the plan decides are
    replaced (and say so in a comment when their value changed), and keys that would contradict the plan or that
    `version` does not accept are removed (listed in `removed`); a dataset, template or output folder it lacks is
    added as below. Without `base` the file is complete: LLaMA-Factory's own example settings, the model's chat
    template, and placeholders (listed in `placeholders`, marked FILL IN) where only the user knows the value (the
    dataset). `epochs` sets num_train_epochs (default: the base's, else 1).
    """
    memory = llamafactory_yaml(setup, version=version, model_name_or_path=model_location(setup.model),
                               deepspeed_path=deepspeed_path)
    out = TrainingYaml()
    if base is not None:
        _merge_into(out, base, memory, setup, version)
        if epochs is not None:
            _set_changed(out, base, "num_train_epochs", float(epochs))
        return out

    for key, value in memory.items():
        out.set(key, value, section=_SECTION_OF.get(key, "method"))
    out.comments["model_name_or_path"] = "hub id or local folder"
    if "deepspeed" in memory:
        out.comments["deepspeed"] = "written next to this file by vlplan plan"
    _add_missing_run_keys(out, setup)
    out.set("learning_rate", _learning_rate(setup.method), "LLaMA-Factory's examples for this method", "train")
    out.set("num_train_epochs", float(epochs if epochs is not None else 1.0), None, "train")
    for key, (section, value, comment) in _RUN_KEYS.items():
        out.set(key, value, comment, section)
    # the examples' `warmup_ratio: 0.1`: transformers 5.0 moved ratios into warmup_steps (a float below 1) and 5.2
    # removed warmup_ratio (huggingface/transformers#41326); LLaMA-Factory before 0.9.5 ("latest") pins transformers 4.x
    if version == "latest":
        out.set("warmup_steps", 0.1, "a ratio of the total steps (transformers >= 5.0)", "train")
    else:
        out.set("warmup_ratio", 0.1, None, "train")
    order = {name: i for i, name in enumerate(_SECTIONS)}
    first = {key: i for i, key in enumerate(_LEADING_KEYS)}
    keys = sorted(out.config, key=lambda k: (order[out.sections[k]], first.get(k, len(first))))  # stable sort
    out.config = {key: out.config[key] for key in keys}
    return out


# The placeholder dataset per stage: a registered entry of LLaMA-Factory's data/dataset_info.json in the format the
# stage reads (an SFT set is "not applicable in the current training stage" of dpo / kto, and back)
DEMO_DATASETS = {
    "sft": ("mllm_demo", "LLaMA-Factory's bundled multimodal demo, data/mllm_demo.json with images"),
    "dpo": ("rlhf_v", "LLaMA-Factory's multimodal preference entry, ranking: chosen and rejected answers with "
                      "images, llamafactory/RLHF-V on the Hugging Face Hub"),
    "kto": ("kto_en_demo", "LLaMA-Factory's bundled KTO demo, text only: it registers no multimodal KTO set, and the "
                           "plan counted images"),
}


def _add_missing_run_keys(out: TrainingYaml, setup: TrainSetup) -> None:
    """The dataset, chat template and output folder, where the file has none (LLaMA-Factory stops without a
    dataset: "Please specify dataset for training.")."""
    if "dataset" not in out.config:
        # an entry of LLaMA-Factory's data/dataset_info.json of the stage's format, so the file runs as is from the
        # LLaMA-Factory repository root; a real run names its own
        name, what = DEMO_DATASETS[setup.stage]
        out.set("dataset", name, f"{FILL_IN}: your dataset's name in dataset_info.json ({name} is {what})",
                "dataset")
        out.placeholders.append("dataset")
        if "dataset_dir" not in out.config:
            out.set("dataset_dir", "data", "the folder holding dataset_info.json (LLaMA-Factory's default, "
                    "relative to where you launch)", "dataset")
    if "template" not in out.config:
        template = llamafactory_template(setup.model)
        if template is None:
            out.set("template", TEMPLATE_PLACEHOLDER, f"{FILL_IN}: LLaMA-Factory registers no chat template for "
                    f"{setup.model.hf_id}; name the one its chat format uses", "dataset")
            out.placeholders.append("template")
        else:
            out.set("template", template, f"LLaMA-Factory's template for {setup.model.hf_id}", "dataset")
    if "output_dir" not in out.config:
        safe_name = re.sub(r"[^A-Za-z0-9._-]+", "-", setup.model.name).strip("-") or "model"
        out.set("output_dir", f"saves/{safe_name}/{setup.method}/sft", None, "output")


def _set_changed(out: TrainingYaml, base: dict, key: str, value) -> None:
    """Set a key the plan decides, with a comment saying what the input file had when that differs."""
    unchanged = key in base and base[key] == value
    out.set(key, value, None if unchanged else f"vlplan plan (was {base.get(key, 'unset')})")


def _merge_into(out: TrainingYaml, base: dict, memory: dict, setup: TrainSetup, version: str) -> None:
    accepted = llamafactory_keys(version)
    written = dict(memory)
    # what the plan does not decide stays the file's own: its stage (the plan keeps the file's stage) and do_train,
    # and how it names the model when that is the planned model
    for key in ("stage", "do_train"):
        if key in base:
            written.pop(key)
    if "model_name_or_path" in base and _same_model(base["model_name_or_path"], setup.model):
        written.pop("model_name_or_path")
    if "additional_target" in base:
        # keep the file's other fully trained modules; the plan decides only whether the projector is among them
        others = [t for t in _lora_target(base["additional_target"], "additional_target").split(",")
                  if t != "none" and not projector_key_in([t], setup.model)]
        if setup.method in ("lora", "qlora", "oft") and setup.projector is not Train.FROZEN:
            others.append(projector_key(setup.model.family))
        if others and setup.method in ("lora", "qlora", "oft"):
            written["additional_target"] = ",".join(others)
    for key, value in base.items():
        if key in written:
            _set_changed(out, base, key, written.pop(key))
        elif key in _PLAN_OWNED or (key in VERSIONED_KEYS and key not in accepted):
            out.removed.append(key)
        elif key == "warmup_ratio" and version == "latest" and "warmup_steps" not in base:
            # transformers 5.2 removed warmup_ratio; warmup_steps below 1 is the same ratio (transformers#41326)
            out.set("warmup_steps", value, "was warmup_ratio, which transformers 5.2 removed")
        else:
            out.set(key, value)
    for key, value in written.items():
        _set_changed(out, base, key, value)
    _add_missing_run_keys(out, setup)


def _same_model(name, spec) -> bool:
    from ..registry import resolve

    if not isinstance(name, str):
        return False
    try:
        return resolve(name) == spec
    except VlplanError:
        return False


_KEY_RE = re.compile(r"^[a-z_][a-z0-9_]*$")


def dump_yaml(config: dict, version: str = "latest", *, comments: dict[str, str] | None = None,
              sections: dict[str, str] | None = None, placeholders: bool = False) -> str:
    """The YAML text of an exported config, keys in the order written, with a header saying where it came from;
    `comments` go after their key's value (above it for a value of several lines), `sections` put a `### name`
    line where the section changes (as LLaMA-Factory's examples do)."""
    import yaml

    for key in config:
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise VlplanError(f"not a LLaMA-Factory key: {key!r}")
    comments, sections = comments or {}, sections or {}
    target = "the current LLaMA-Factory" if version == "latest" else f"LLaMA-Factory v{version}"
    lines = [f"# Written by vlplan for {target}: llamafactory-cli train <this file>"]
    if placeholders:
        lines.append(f"# Values marked '{FILL_IN}' are placeholders: replace them before training.")
    section = None
    for key, value in config.items():
        if sections.get(key) and sections[key] != section:
            section = sections[key]
            lines += ["", f"### {section}"]
        text = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False, width=10**6).rstrip("\n")
        comment = comments.get(key)
        if comment and "\n" in text:
            lines += [f"# {comment}", text]
        elif comment:
            lines.append(f"{text}  # {comment}")
        else:
            lines.append(text)
    return "\n".join(lines) + "\n"
