"""Step time of a TrainSetup from a FLOPs model: compute at a stated MFU, the recomputation of checkpointing,
data-parallel / ZeRO communication and CPU-offload traffic. Pure arithmetic over the module inventory.

Assumptions (named, printed by `vlplan plan --explain`):
- MFU: 40% of the GPU's dense bf16 peak for fused attention (sdpa/fa2), 30% with eager attention. Fine-tuning
  runs of 7B-70B models with FlashAttention typically reach 35-45% (e.g. LLaMA-Factory scripts/stat_utils/
  cal_mfu.py computes it the same way from measured steps/s).
- No overlap of communication and compute (an upper bound on step time), 10 ms of fixed overhead per micro-step.
- Collective bandwidth per GPU: the catalog's link (NVLink/PCIe) within a node, 25 GB/s between nodes; ring
  algorithms move (N-1)/N of the buffer per rank for reduce-scatter and all-gather, twice that for all-reduce.
- CPU offload: PCIe at 25 GB/s each way, DeepSpeedCPUAdam at 1e9 parameters/s per process.
- Preference stages (LLaMA-Factory): DPO's policy forward and backward run on 2 x batch_size rows (chosen and
  rejected) and, for the sigmoid loss, the reference forward on the same rows without backward; KTO's policy
  forward and backward run on batch_size target rows, and three forwards of batch_size rows run without backward
  (the policy's KL rows, the reference's target and KL rows: planner/memory/preference.py). A LoRA reference is the
  policy with its adapters disabled: the base model's FLOPs.
- A GPU given only by its memory (`--gpu-memory-gib`) has no known throughput: its step times are computed at the
  reference GPU's tensor rate (REFERENCE_GPU) so candidates can still be ranked, and `assumed_throughput_of` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .hardware import find_gpu
from .modules import LANGUAGE, PROJECTOR, VISION, model_inventory
from .setup import Train, TrainSetup

MFU_FUSED = 0.40
MFU_EAGER = 0.30
MICRO_STEP_OVERHEAD_S = 0.010
INTERNODE_GBPS = 25.0
PCIE_GBPS = 25.0
CPU_ADAM_PARAMS_PER_S = 1e9
REFERENCE_GPU = "a100-80g"  # the tensor rate assumed for GPUs of unknown throughput


@dataclass
class StepTime:
    seconds: float
    parts: dict[str, float] = field(default_factory=dict)
    flops: float = 0.0
    mfu: float = 0.0
    assumed_throughput_of: str | None = None  # the catalog GPU whose tensor rate stood in for an unknown one


def _linear_flops_per_token(inventory, exclude=("lm_head",)) -> float:
    return 2.0 * sum(l.in_features * l.out_features * l.count for l in inventory.linears if l.name not in exclude)


def step_time(setup: TrainSetup, mfu: float | None = None) -> StepTime:
    """Seconds per optimizer step (gradient_accumulation_steps micro-batches of batch_size per GPU)."""
    spec = setup.model
    inv = model_inventory(spec)
    t = spec.text
    rows = setup.rows_per_micro_batch  # batch_size; DPO: chosen and rejected rows in one forward
    tokens = rows * setup.seq_len
    patches = rows * setup.vision_patches_per_sample
    trains = setup.trains

    # forward FLOPs per micro-batch
    lm_linear = _linear_flops_per_token(inv[LANGUAGE]) * tokens
    lm_attention = 2.0 * t.num_layers * setup.seq_len * t.num_heads * t.head_dim * tokens  # causal QK^T + PV
    head = 2.0 * t.vocab_size * t.hidden_size * tokens
    images = [im.vision_patches for im in setup.image_tokens()]
    vit = _linear_flops_per_token(inv[VISION]) * patches + _linear_flops_per_token(inv[PROJECTOR]) * patches / 4
    vit_attention = 4.0 * spec.vision.num_layers * spec.vision.hidden_size * sum(p * p for p in images) * rows
    forward_lm = lm_linear + lm_attention + head
    forward_vision = vit + vit_attention

    # backward: activation gradients wherever something upstream trains, weight gradients of trainable linears
    lm_trains = trains[LANGUAGE] is not Train.FROZEN
    vision_trains = trains[VISION] is not Train.FROZEN or trains[PROJECTOR] is not Train.FROZEN
    backward = forward_lm if (lm_trains or vision_trains) else head
    if trains[LANGUAGE] is Train.FULL:
        backward += lm_linear + head
    if vision_trains:
        backward += forward_vision + (vit if trains[VISION] is Train.FULL else 0.0)
    recompute = 0.0  # per component (ms-swift vit_gradient_checkpointing: `TrainSetup.checkpointing`)
    if setup.checkpointing(LANGUAGE):
        recompute += (lm_linear + lm_attention) if lm_trains or vision_trains else 0.0
    if setup.checkpointing(VISION):
        recompute += forward_vision if vision_trains else 0.0
    # forwards without backward (no_grad): DPO's reference forward, KTO's KL forward and reference forwards
    no_grad_forwards = {}
    if setup.stage == "dpo" and setup.uses_reference:
        no_grad_forwards["reference_forward"] = forward_lm + forward_vision
    elif setup.stage == "kto":
        no_grad_forwards["kl_forward"] = forward_lm + forward_vision
        no_grad_forwards["reference_forward"] = 2 * (forward_lm + forward_vision)
    micro_flops = forward_lm + forward_vision + backward + recompute + sum(no_grad_forwards.values())
    if mfu is None:
        mfu = MFU_EAGER if setup.attn == "eager" else MFU_FUSED
    peak = setup.gpu.tflops_bf16 * 1e12
    assumed = None
    if peak <= 0:
        assumed = REFERENCE_GPU
        peak = find_gpu(REFERENCE_GPU).tflops_bf16 * 1e12
    parts = {}
    micro_steps = setup.gradient_accumulation_steps
    extra = sum(no_grad_forwards.values())
    parts["compute"] = micro_steps * (micro_flops - recompute - extra) / (peak * mfu)
    parts["recompute"] = micro_steps * recompute / (peak * mfu)
    for key, flops in no_grad_forwards.items():
        parts[key] = micro_steps * flops / (peak * mfu)
    parts["micro_step_overhead"] = micro_steps * MICRO_STEP_OVERHEAD_S

    # communication per step
    n = setup.world_size
    trainable = _trainable_params(setup)
    total = sum(i.params for i in inv.values())
    half = 2
    bandwidth = (INTERNODE_GBPS if setup.num_nodes > 1 else setup.gpu.link_gbps) * 1e9
    ring = (n - 1) / n if n > 1 else 0.0
    if setup.sharding == "fsdp":
        parts.update(_fsdp_parts(setup, bandwidth, trainable))
    elif n > 1:
        if setup.zero == 0:
            grad_bytes = trainable * (2 if setup.precision == "pure-bf16" else 4)
            parts["allreduce_gradients"] = 2 * ring * grad_bytes / bandwidth
        elif setup.zero in (1, 2):
            # ZeRO-2 keeps only its gradient partition, so it reduce-scatters at every micro-step; ZeRO-1 once
            reductions = micro_steps if setup.zero == 2 else 1
            parts["reduce_scatter_gradients"] = reductions * ring * half * trainable / bandwidth
            parts["allgather_parameters"] = ring * half * trainable / bandwidth
        else:
            # every micro-step gathers all parameters for forward and again for backward
            parts["allgather_parameters"] = micro_steps * 2 * ring * half * total / bandwidth
            parts["reduce_scatter_gradients"] = micro_steps * ring * half * trainable / bandwidth
    if setup.offload_checkpoints:
        # use_unsloth_gc: each checkpointed layer's input to the host in forward and back in backward, per
        # micro-step (non-blocking copies that may overlap compute: counted in full, an upper bound)
        moved = t.num_layers * tokens * t.hidden_size if setup.checkpointing(LANGUAGE) and lm_trains else 0
        if setup.checkpointing(VISION) and vision_trains:
            moved += spec.vision.num_layers * patches * spec.vision.hidden_size
        parts["offload_checkpoints"] = micro_steps * 2 * half * moved / (PCIE_GBPS * 1e9)
    if setup.offload != "none" and setup.sharding == "zero":
        shard = trainable / n
        parts["offload_transfer"] = (2 * half * shard) / (PCIE_GBPS * 1e9)
        parts["cpu_adam"] = shard / CPU_ADAM_PARAMS_PER_S
        if setup.offload == "all":
            parts["offload_parameters"] = micro_steps * 2 * half * total / n / (PCIE_GBPS * 1e9)
    return StepTime(sum(parts.values()), parts, micro_flops * micro_steps, mfu, assumed)


def _fsdp_parts(setup: TrainSetup, bandwidth: float, trainable: int) -> dict[str, float]:
    """FSDP2's collectives (memory/fsdp.py `fsdp_communication_bytes`): all-gather and reduce-scatter over the shard
    group (a node's GPUs for hybrid_shard, at the link's bandwidth), the replicas' all-reduce over the nodes (or all
    GPUs for no_shard), CPU offload's PCIe traffic and the optimizer step on the CPU."""
    from .memory.fsdp import fsdp_communication_bytes, shard_size

    n = shard_size(setup)
    shard_bandwidth = (setup.gpu.link_gbps if setup.fsdp == "hybrid_shard" else bandwidth / 1e9) * 1e9
    ring = (n - 1) / n if n > 1 else 0.0
    replicas = setup.world_size // n
    parts = {}
    for key, volume in fsdp_communication_bytes(setup).items():
        if key == "offload_parameters":
            parts[key] = volume / (PCIE_GBPS * 1e9)
        elif key == "allreduce_gradients":
            parts[key] = (replicas - 1) / replicas * volume / bandwidth
        else:
            parts[key] = ring * volume / shard_bandwidth
    if setup.offload == "all":
        parts["cpu_adam"] = trainable / n / CPU_ADAM_PARAMS_PER_S  # the optimizer step runs on the host
    return parts


def _trainable_params(setup: TrainSetup) -> int:
    from .memory.estimate import param_summary

    return param_summary(setup)[1]["total"]
