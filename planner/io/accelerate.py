"""accelerate's launch config (`accelerate launch --config_file fsdp.yaml`) for FSDP: read it into setup fields, and
write the one a plan needs.

LLaMA-Factory runs FSDP through accelerate: `accelerate launch --config_file examples/accelerate/fsdp_config.yaml
src/train.py train.yaml` (its README, "FSDP+QLoRA"; the training YAML itself has no FSDP key). The keys are those
`accelerate config` writes (accelerate 1.16 commands/config/config_args.py `ClusterConfig`); `accelerate launch`
copies `fsdp_config.<key>` to `--<key>` and exports them as the FSDP_* variables `FullyShardedDataParallelPlugin`
reads (utils/launch.py `prepare_multi_gpu_env`). FSDP version 2 (`fully_shard`) takes `fsdp_reshard_after_forward`
(true: full shard, false: shard_grad_op) and `fsdp_offload_params` (CPUOffloadPolicy); hybrid sharding is a 2D mesh
set by `parallelism_config` (`parallelism_config_dp_replicate_size` x `parallelism_config_dp_shard_size`).
Version 1's `fsdp_sharding_strategy` is read too and estimated as the FSDP2 strategy of the same name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import VlplanError
from ..setup import TrainSetup

# accelerate's FSDP1 sharding strategies (utils/constants.py FSDP_SHARDING_STRATEGY, 1-based in configs)
FSDP1_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")
_FSDP1_TO_VLPLAN = {"FULL_SHARD": "full_shard", "SHARD_GRAD_OP": "shard_grad_op", "NO_SHARD": "no_shard",
                    "HYBRID_SHARD": "hybrid_shard", "HYBRID_SHARD_ZERO2": "hybrid_shard"}
_MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "no": "fp32"}
# the keys vlplan reads; the others (state dict type, prefetch, RAM-efficient loading, ...) do not change memory
# within the model: loading and saving happen outside the training step
READ_KEYS = ("distributed_type", "num_processes", "num_machines", "mixed_precision", "fsdp_config",
             "parallelism_config")


@dataclass(frozen=True)
class AccelerateSettings:
    """What an accelerate config says about the setup."""

    fsdp: str
    offload: str
    num_gpus: int
    num_nodes: int
    precision: str | None  # None: the config leaves it to the training arguments
    fsdp_version: int

    def setup_fields(self) -> dict:
        fields = {"sharding": "fsdp", "fsdp": self.fsdp, "offload": self.offload, "num_gpus": self.num_gpus,
                  "num_nodes": self.num_nodes, "zero": 0}
        return fields


def _bool(value, key: str, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise VlplanError(f"{name}: {key} must be true or false, got {value!r}")


def _count(config: dict, key: str, name: str, default: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise VlplanError(f"{name}: {key} must be a positive integer, got {value!r}")
    return value


def read_accelerate_config(source: str | Path | dict) -> tuple[AccelerateSettings, list[str]]:
    """The FSDP settings of an accelerate config file (YAML or JSON, as `accelerate config` writes it)."""
    if isinstance(source, dict):
        config, name = source, "accelerate config"
    else:
        from .llamafactory import load_yaml

        path = Path(source).expanduser()
        if not path.is_file():
            raise VlplanError(f"accelerate config {source} does not exist; pass the file given to `accelerate launch "
                              "--config_file`")
        config, name = load_yaml(path), str(source)
    warnings: list[str] = []
    kind = str(config.get("distributed_type", "NO")).upper()
    if kind != "FSDP":
        raise VlplanError(f"{name}: distributed_type {kind} is not FSDP; vlplan reads accelerate configs for FSDP "
                          "(for DeepSpeed pass its JSON with --deepspeed)")
    fsdp = config.get("fsdp_config") or {}
    if not isinstance(fsdp, dict):
        raise VlplanError(f"{name}: fsdp_config must be a mapping, got {type(fsdp).__name__}")
    version = fsdp.get("fsdp_version", 1)
    if version not in (1, 2, "1", "2"):
        raise VlplanError(f"{name}: fsdp_version must be 1 or 2, got {version!r}")
    version = int(version)
    nodes = _count(config, "num_machines", name, 1)
    processes = _count(config, "num_processes", name, 1)
    if processes % nodes:
        raise VlplanError(f"{name}: num_processes {processes} (all GPUs) is not a multiple of num_machines {nodes}")
    gpus = processes // nodes
    if version == 2:
        reshard = _bool(fsdp.get("fsdp_reshard_after_forward", True), "fsdp_reshard_after_forward", name)
        strategy = "full_shard" if reshard else "shard_grad_op"
        parallel = config.get("parallelism_config") or {}
        replicate = parallel.get("parallelism_config_dp_replicate_size", 1)
        shard = parallel.get("parallelism_config_dp_shard_size", processes // max(int(replicate), 1))
        if int(replicate) > 1:
            if int(shard) == 1:
                strategy = "no_shard"
            elif int(shard) == gpus and int(replicate) == nodes:
                strategy = "hybrid_shard"
            else:
                raise VlplanError(f"{name}: parallelism_config replicates {replicate} x shards {shard}; vlplan "
                                  f"estimates hybrid sharding within each node ({nodes} x {gpus})")
            if not reshard:
                warnings.append(f"{name}: fsdp_reshard_after_forward false with replication is estimated as "
                                f"{strategy} (resharded after forward): an underestimate")
    else:
        raw = fsdp.get("fsdp_sharding_strategy", "FULL_SHARD")
        if isinstance(raw, int) or (isinstance(raw, str) and raw.isdigit()):
            index = int(raw)
            if not 1 <= index <= len(FSDP1_STRATEGIES):
                raise VlplanError(f"{name}: fsdp_sharding_strategy {raw} is not 1-{len(FSDP1_STRATEGIES)}")
            raw = FSDP1_STRATEGIES[index - 1]
        if str(raw).upper() not in _FSDP1_TO_VLPLAN:
            raise VlplanError(f"{name}: fsdp_sharding_strategy {raw!r} is not one of {', '.join(FSDP1_STRATEGIES)}")
        strategy = _FSDP1_TO_VLPLAN[str(raw).upper()]
        warnings.append(f"{name}: FSDP version 1 ({str(raw).upper()}) is estimated as FSDP2's {strategy} (the same "
                        "units and sharding; FSDP1's flat-parameter buffers are not modelled apart)")
        if str(raw).upper() == "HYBRID_SHARD_ZERO2":
            warnings.append(f"{name}: HYBRID_SHARD_ZERO2 keeps parameters unsharded after forward within a node; "
                            "it is estimated as hybrid_shard (resharded): an underestimate")
    offload = "all" if _bool(fsdp.get("fsdp_offload_params", False), "fsdp_offload_params", name) else "none"
    if _bool(fsdp.get("fsdp_activation_checkpointing", False), "fsdp_activation_checkpointing", name):
        warnings.append(f"{name}: fsdp_activation_checkpointing is accelerate's own checkpoint wrapper; vlplan "
                        "estimates the training stack's gradient checkpointing (LLaMA-Factory's), which it replaces "
                        "only when that is off")
    mixed = config.get("mixed_precision")
    precision = None
    if mixed is not None:
        if str(mixed) not in _MIXED_PRECISION:
            raise VlplanError(f"{name}: mixed_precision {mixed!r} is not one of {', '.join(_MIXED_PRECISION)}")
        precision = _MIXED_PRECISION[str(mixed)]
    return AccelerateSettings(strategy, offload, gpus, nodes, precision, version), warnings


def accelerate_config(setup: TrainSetup) -> dict:
    """The accelerate config (FSDP version 2) that launches `setup`: what `accelerate config` would write for it.

    The wrap policy is TRANSFORMER_BASED_WRAP without a class list: accelerate then wraps the model's
    `_no_split_modules` (the decoder layers and vision blocks vlplan's estimate assumes). Activation checkpointing
    stays with the training stack (LLaMA-Factory's `gradient_checkpointing`), not accelerate's wrapper."""
    if setup.sharding != "fsdp":
        raise VlplanError("the plan shards with DeepSpeed ZeRO, not FSDP: export its DeepSpeed config instead")
    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no", "pure-bf16": "no"}[setup.precision]
    fsdp = {
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_reshard_after_forward": setup.fsdp != "shard_grad_op",
        "fsdp_offload_params": setup.offload == "all",
        "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_activation_checkpointing": False,
    }
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "distributed_type": "FSDP",
        "downcast_bf16": "no",
        "fsdp_config": fsdp,
        "machine_rank": 0,
        "main_training_function": "main",
        "mixed_precision": mixed,
        "num_machines": setup.num_nodes,
        "num_processes": setup.world_size,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    if setup.fsdp in ("hybrid_shard", "no_shard"):
        shard = setup.num_gpus if setup.fsdp == "hybrid_shard" else 1
        config["parallelism_config"] = {"parallelism_config_dp_replicate_size": setup.world_size // shard,
                                        "parallelism_config_dp_shard_size": shard}
    return config


def dump_accelerate_config(setup: TrainSetup) -> str:
    import yaml

    return yaml.safe_dump(accelerate_config(setup), sort_keys=False)


def default_accelerate_name(setup: TrainSetup) -> str:
    return f"fsdp2_{setup.fsdp}{'_offload' if setup.offload == 'all' else ''}.yaml"
