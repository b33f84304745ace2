"""DeepSpeed JSON configs <-> the TrainSetup fields they decide (zero, offload, ds_reduce_bucket_size, ds_overlap_comm).

`read_deepspeed(path_or_dict)` reads a user's config, including the "auto" values that the HF Trainer fills in
(transformers `integrations/deepspeed.py::HfTrainerDeepSpeedConfig`). `deepspeed_from_name(name)` infers the stage
and offload from LLaMA-Factory's file names (`examples/deepspeed/ds_z3_offload_config.json`) and XTuner's built-in
names (`deepspeed_zero2_offload`) when the file itself is not at hand. `deepspeed_config(setup)` writes a config in
LLaMA-Factory's style (its `examples/deepspeed/ds_z{0,2,3}[_offload]_config.json`, shared/reference/llamafactory.md
section 3) with "auto" batch, clipping and precision fields, so one file serves every batch size.
`tests/test_io_deepspeed.py` feeds the written configs to DeepSpeed's own `DeepSpeedConfig`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import VlplanError

AUTO = "auto"
# DeepSpeedZeroConfig's defaults of the ZeRO-3 knobs vlplan does not model (deepspeed/runtime/zero/config.py)
DS_ZERO3_KNOB_DEFAULTS = {"stage3_prefetch_bucket_size": 50_000_000, "stage3_max_live_parameters": 1_000_000_000,
                          "stage3_max_reuse_distance": 1_000_000_000, "stage3_param_persistence_threshold": 100_000,
                          "allgather_bucket_size": 500_000_000, "sub_group_size": 1_000_000_000}
# DeepSpeed's own default (runtime/zero/config.py, DeepSpeedZeroConfig.reduce_bucket_size = 5e8 elements); the
# LLaMA-Factory ZeRO-0/2 files write it out, its ZeRO-3 files leave it "auto" (hidden_size**2, filled by HF)
DS_REDUCE_BUCKET_SIZE = 500_000_000


@dataclass(frozen=True)
class DeepSpeedSettings:
    """What a DeepSpeed config decides for memory, plus the batch/precision numbers it may pin (None: "auto")."""

    zero: int = 0
    offload: str = "none"  # none | optimizer | all
    reduce_bucket_size: int | None = None  # None: "auto" (hidden_size**2 elements)
    overlap_comm: bool = False
    micro_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    gradient_clipping: float | None = None
    bf16: bool | None = None  # None: "auto" or no block (the training arguments decide)
    fp16: bool | None = None
    source: str = ""

    def setup_fields(self) -> dict:
        """The TrainSetup fields this config sets."""
        return dict(zero=self.zero, offload=self.offload, ds_reduce_bucket_size=self.reduce_bucket_size,
                    ds_overlap_comm=self.overlap_comm)


def load_json(path: str | Path, what: str = "JSON file") -> object:
    """Read a JSON file, turning every failure into a one-line VlplanError."""
    path = Path(path)
    if not path.is_file():
        raise VlplanError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise VlplanError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except UnicodeDecodeError:
        raise VlplanError(f"{path}: not a UTF-8 text file") from None


def read_deepspeed(source: str | Path | dict) -> tuple[DeepSpeedSettings, list[str]]:
    """The settings of a DeepSpeed config (a path or an already-loaded dict) and warnings for what is not modelled."""
    if isinstance(source, dict):
        config, name = source, "deepspeed config"
    else:
        config, name = load_json(source, "DeepSpeed config"), str(source)
    if not isinstance(config, dict):
        raise VlplanError(f"{name}: a DeepSpeed config is a JSON object, got {type(config).__name__}")
    warnings: list[str] = []
    zero_block = config.get("zero_optimization", {})
    if not isinstance(zero_block, dict):
        raise VlplanError(f"{name}: zero_optimization must be an object, got {zero_block!r}")
    stage = zero_block.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise VlplanError(f"{name}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    offload = _offload(zero_block, stage, name, warnings)
    bucket = zero_block.get("reduce_bucket_size", DS_REDUCE_BUCKET_SIZE)
    reduce_bucket_size = None if bucket == AUTO else _count(bucket, f"{name}: zero_optimization.reduce_bucket_size")
    # DeepSpeedZeroConfig.overlap_comm: None -> True for stage 3, False otherwise (runtime/zero/config.py validator)
    overlap = zero_block.get("overlap_comm")
    if overlap is None:
        overlap = stage == 3
    elif not isinstance(overlap, bool):
        raise VlplanError(f"{name}: zero_optimization.overlap_comm must be true or false, got {overlap!r}")
    for key, off in (("zero_quantized_weights", False), ("zero_quantized_gradients", False),
                     ("zero_hpz_partition_size", 1)):
        value = zero_block.get(key)
        if value is not None and (value is not off if isinstance(off, bool) else value != off):  # True == 1
            warnings.append(f"{name}: zero_optimization.{key} (ZeRO++) is not modelled; the estimate assumes plain "
                            "ZeRO partitions")
    # ZeRO-3's gathered parameters are modelled as DeepSpeed's own estimator does (4 bytes x the largest layer,
    # planner/memory/zero.py), not from the prefetch and live-parameter knobs: a value other than DeepSpeed's default
    # (runtime/zero/config.py DeepSpeedZeroConfig; LLaMA-Factory's ds_z3 configs write the 1e9 defaults out) is named
    knobs = [key for key, default in DS_ZERO3_KNOB_DEFAULTS.items() if zero_block.get(key) not in (None, AUTO, default)]
    if knobs and stage == 3:
        warnings.append(f"{name}: zero_optimization.{', '.join(knobs)} not modelled: the gathered ZeRO-3 parameters "
                        "are estimated as DeepSpeed's estimator does (4 bytes x the largest layer), whatever these say")
    optimizer = config.get("optimizer")
    if isinstance(optimizer, dict) and str(optimizer.get("type", "")).lower() not in ("adam", "adamw", ""):
        warnings.append(f"{name}: DeepSpeed optimizer {optimizer.get('type')!r} is not modelled; the estimate uses "
                        "the setup's optimizer")
    if "tensor_parallel" in config:
        warnings.append(f"{name}: tensor_parallel (AutoTP) is not modelled; the estimate assumes data parallelism")
    settings = DeepSpeedSettings(
        zero=stage, offload=offload, reduce_bucket_size=reduce_bucket_size, overlap_comm=overlap,
        micro_batch_size=_maybe_count(config.get("train_micro_batch_size_per_gpu"),
                                      f"{name}: train_micro_batch_size_per_gpu"),
        gradient_accumulation_steps=_maybe_count(config.get("gradient_accumulation_steps"),
                                                 f"{name}: gradient_accumulation_steps"),
        gradient_clipping=_maybe_float(config.get("gradient_clipping"), f"{name}: gradient_clipping"),
        bf16=_enabled(config.get("bf16", config.get("bfloat16")), f"{name}: bf16.enabled"),
        fp16=_enabled(config.get("fp16"), f"{name}: fp16.enabled"), source=name)
    if settings.bf16 and settings.fp16:
        raise VlplanError(f"{name}: bf16 and fp16 are both enabled; enable one (or set both to \"auto\")")
    return settings, warnings


def _offload(zero_block: dict, stage: int, name: str, warnings: list[str]) -> str:
    devices = {}
    for key in ("offload_optimizer", "offload_param"):
        block = zero_block.get(key)
        if block is None:
            devices[key] = "none"
            continue
        if not isinstance(block, dict):
            raise VlplanError(f"{name}: zero_optimization.{key} must be an object, got {block!r}")
        device = block.get("device", "none")
        if device not in ("none", "cpu", "nvme"):
            raise VlplanError(f"{name}: zero_optimization.{key}.device must be none, cpu or nvme, got {device!r}")
        if device == "nvme":
            warnings.append(f"{name}: {key} to NVMe is modelled as CPU offload (same GPU memory, host RAM not "
                            "counted for NVMe)")
        devices[key] = device
    optimizer, param = devices["offload_optimizer"] != "none", devices["offload_param"] != "none"
    if param and stage != 3:
        raise VlplanError(f"{name}: offload_param needs ZeRO stage 3 (the config has stage {stage})")
    if optimizer and stage == 0:
        raise VlplanError(f"{name}: offload_optimizer needs ZeRO stage 1, 2 or 3 (the config has stage 0)")
    if param and not optimizer:
        warnings.append(f"{name}: offload_param without offload_optimizer is modelled as offloading both "
                        "(the optimizer states stay on the GPU in reality: the estimate is low)")
    return "all" if param else "optimizer" if optimizer else "none"


def _count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value <= 0:
        raise VlplanError(f"{what} must be a positive integer or \"auto\", got {value!r}")
    return int(value)


def _maybe_count(value, what: str) -> int | None:
    return None if value in (None, AUTO) else _count(value, what)


def _maybe_float(value, what: str) -> float | None:
    if value in (None, AUTO):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise VlplanError(f"{what} must be a number >= 0 or \"auto\", got {value!r}")
    return float(value)


def _enabled(block, what: str) -> bool | None:
    if block is None:
        return None
    if not isinstance(block, dict):
        raise VlplanError(f"{what.rsplit('.', 1)[0]} must be an object, got {block!r}")
    value = block.get("enabled", False)
    if value == AUTO:
        return None
    if not isinstance(value, bool):
        raise VlplanError(f"{what} must be true, false or \"auto\", got {value!r}")
    return value


# LLaMA-Factory `ds_z3_offload_config.json`, XTuner `deepspeed_zero2_offload`, `zero3.json`, `ds_config_zero2.json`
_STAGE_IN_NAME = re.compile(r"(?:^|[^a-z0-9])(?:ds_?)?z(?:ero)?_?(?:stage_?)?([0-3])(?![0-9])", re.IGNORECASE)


def deepspeed_from_name(name: str) -> tuple[DeepSpeedSettings, list[str]]:
    """Infer a missing config from its file name (LLaMA-Factory's and XTuner's naming), with a warning."""
    base = Path(name).name
    match = _STAGE_IN_NAME.search(base)
    if not match:
        raise VlplanError(f"DeepSpeed config {name} does not exist and its name does not say the ZeRO stage "
                          "(expected a name like ds_z3_offload_config.json); pass the file with --deepspeed")
    stage = int(match.group(1))
    offload = "none"
    if "offload" in base.lower():
        # LLaMA-Factory's ds_z3_offload_config.json offloads parameters and optimizer, ds_z2_offload the optimizer
        offload = "all" if stage == 3 else "optimizer"
        if stage == 0:
            raise VlplanError(f"DeepSpeed config name {base} asks for offload with ZeRO stage 0")
    settings = DeepSpeedSettings(zero=stage, offload=offload,
                                 reduce_bucket_size=None if stage == 3 else DS_REDUCE_BUCKET_SIZE,
                                 overlap_comm=False, source=name)
    warning = (f"DeepSpeed config {name} not found; assumed LLaMA-Factory's {base} (ZeRO-{stage}, offload {offload}, "
               "overlap_comm false)")
    return settings, [warning]


def deepspeed_config(setup) -> dict:
    """A DeepSpeed config for `setup` in LLaMA-Factory's style; batch, clipping and precision are "auto" (filled by
    the HF Trainer from the training arguments), the ZeRO block carries the setup's stage, offload and buffers."""
    config: dict = {
        "train_batch_size": AUTO,
        "train_micro_batch_size_per_gpu": AUTO,
        "gradient_accumulation_steps": AUTO,
        "gradient_clipping": AUTO,
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": AUTO, "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                 "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": AUTO},
    }
    bucket = setup.ds_reduce_bucket_size if setup.ds_reduce_bucket_size else AUTO
    zero: dict = {"stage": setup.zero}
    if setup.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if setup.offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if setup.zero == 3:
        zero.update({"overlap_comm": setup.ds_overlap_comm, "contiguous_gradients": True, "sub_group_size": 1e9,
                     "reduce_bucket_size": bucket, "stage3_prefetch_bucket_size": AUTO,
                     "stage3_param_persistence_threshold": AUTO, "stage3_max_live_parameters": 1e9,
                     "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True})
    else:
        zero.update({"allgather_partitions": True, "allgather_bucket_size": 5e8, "overlap_comm": setup.ds_overlap_comm,
                     "reduce_scatter": True, "reduce_bucket_size": bucket, "contiguous_gradients": True,
                     "round_robin_gradients": True})
    config["zero_optimization"] = zero
    return config
