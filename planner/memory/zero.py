"""Model states under DeepSpeed ZeRO and DDP: what each GPU and each host hold.

ZeRO (DeepSpeed runtime/zero/stage_1_and_2.py, stage3.py) with bf16/fp16 keeps half-precision parameters on the GPU,
fp32 master weights, fp32 gradients and the optimizer states partitioned over the data-parallel ranks. Per trainable
parameter and GPU (N ranks), matching DeepSpeed's own estimators for full fine-tuning
(`estimate_zero2_model_states_mem_needs`: 2P + 18P/N; `estimate_zero3_model_states_mem_needs`:
4*largest_layer + 18P/N):

| stage | half params | grads | fp32 master + Adam | notes |
| 1 | 2 (all) | 2 (all) + 4/N | 12/N | |
| 2 | 2 (all) | (2 + 4)/N | 12/N | |
| 3 | 2/N (all) | 4/N | 12/N | + 4 bytes x largest layer of gathered ("live") parameters |

Frozen parameters (LoRA's base model) are not in the optimizer: ZeRO-1/2 leave them whole on every GPU, ZeRO-3
partitions them with everything else. DeepSpeed's estimators count every parameter as trainable (DeepSpeed #5304);
vlplan does not. Offload moves the fp32 master, gradients and Adam states (and with ZeRO-3 `offload_param`, the
parameters) to pinned host memory; the host totals follow DeepSpeed's estimators, including their 1.5x buffer factor.

Communication buffers: the IPG reduce bucket (`reduce_bucket_size` elements of the half dtype, twice with
`overlap_comm`); HF's "auto" value is hidden_size**2 (transformers integrations/deepspeed.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..setup import TrainSetup

DS_ADDITIONAL_BUFFER_FACTOR = 1.5  # deepspeed estimators' `additional_buffer_factor` (host side)


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU by name, and host bytes per node for offloaded states."""

    gpu: dict[str, int]
    cpu_per_node: dict[str, int]


def deepspeed_model_states(setup: TrainSetup, total_params: int, trainable_params: int,
                           largest_layer_params: int, half_bytes: int = 2) -> ModelStates:
    """Per-GPU model states of DeepSpeed ZeRO `setup.zero` (1-3) for `trainable_params` of `total_params`."""
    n = setup.world_size
    stage, offload = setup.zero, setup.offload
    frozen = total_params - trainable_params
    gpu: dict[str, int] = {}
    cpu: dict[str, int] = {}
    states_per_param = 16  # 4 fp32 gradients + 4 fp32 master + 8 Adam (exp_avg, exp_avg_sq)
    if stage in (1, 2):
        gpu["weights/half"] = half_bytes * total_params
        if stage == 1:
            gpu["gradients/half"] = half_bytes * trainable_params
        if offload == "none":
            if stage == 2:
                gpu["gradients/half_partition"] = half_bytes * trainable_params // n
            gpu["optimizer/fp32_grads_master_adam"] = states_per_param * trainable_params // n
        else:
            # estimate_zero2_model_states_mem_needs(cpu_offload=True): cpu = P * max(4 * total_gpus, 16) * 1.5
            cpu["offload/optimizer"] = int(trainable_params * max(4 * n, 16) * DS_ADDITIONAL_BUFFER_FACTOR)
    else:
        live = 4 * largest_layer_params
        gpu["zero3/live_parameters"] = live
        gpus_factor = 1 / setup.num_nodes
        if offload == "none":
            gpu["weights/half_partition"] = half_bytes * total_params // n
            gpu["optimizer/fp32_grads_master_adam"] = states_per_param * trainable_params // n
        elif offload == "optimizer":
            gpu["weights/half_partition"] = half_bytes * total_params // n
            cpu["offload/optimizer"] = int(trainable_params * 16 * gpus_factor * DS_ADDITIONAL_BUFFER_FACTOR)
        else:
            cpu["offload/parameters_and_optimizer"] = int(
                (trainable_params * 18 + frozen * half_bytes) * gpus_factor * DS_ADDITIONAL_BUFFER_FACTOR)
    return ModelStates(gpu, cpu)


def reduce_bucket_bytes(setup: TrainSetup, half_bytes: int = 2) -> int:
    """The IPG gradient-reduction buffer of ZeRO 1/2/3 (contiguous_gradients), in the half dtype."""
    hidden = setup.model.text.hidden_size
    elements = setup.ds_reduce_bucket_size if setup.ds_reduce_bucket_size else hidden * hidden
    return elements * half_bytes * (2 if setup.ds_overlap_comm and setup.zero in (1, 2) else 1)


def ddp_bucket_bytes(gradient_bytes: int) -> int:
    """torch DDP's reducer keeps flat bucket buffers covering every gradient (gradient_as_bucket_view=False, the
    Trainer's default): a second copy of the gradients (torch/csrc/distributed/c10d/reducer.cpp)."""
    return gradient_bytes
