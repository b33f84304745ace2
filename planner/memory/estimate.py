"""`estimate(setup)`: per-GPU peak device memory of one training step, its phase and an itemised breakdown.

The live-tensor part comes from `step.simulate` (the symbolic re-execution of the modeling code); model states are
re-partitioned for ZeRO and DDP (`zero.py`); reserved memory comes from replaying the simulation's allocation sequence
through a model of the CUDA caching allocator (`allocator.py`, `reserved_replay`); the device overheads outside the
caching allocator are the named constants of `overheads.py`. `breakdown_bytes` sums to `peak_bytes` exactly
(asserted).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .. import cache
from ..modules import LANGUAGE, model_inventory
from ..setup import Train, TrainSetup
from . import overheads
from . import step as _step
from .allocator import ReplayResult, replay
from .step import PHASES, register_memo, simulate_extrapolated, simulate_log, simulation_key
from .fsdp import (
    activation_setup,
    fsdp_breakdown,
    fsdp_states,
    quant_state_bytes,
    quantized_linear_params,
    quantized_weight_bytes,
    single_gpu_optimizer_bytes,
    zero3_partitioned_params,
)
from .zero import ddp_bucket_bytes, deepspeed_model_states, reduce_bucket_bytes

PERSISTENT_PREFIXES = ("weights/", "adapters/", "optimizer/", "inputs/", "gradients/", "zero", "ddp/",
                       "reference/")  # reference/: DPO's frozen reference copy (preference.py)  # fsdp/: buffers


@dataclass
class Estimate:
    setup: TrainSetup
    params: dict[str, int]
    trainable_params: dict[str, int]
    peak_phase: str
    allocated_peak_bytes: int
    peak_bytes: int
    breakdown_bytes: dict[str, int]
    phase_allocated_bytes: dict[str, int]
    cpu_ram_bytes: int
    cpu_breakdown_bytes: dict[str, int]
    allocator: dict = field(default_factory=dict)  # the caching-allocator replay behind cuda/allocator_reserve

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.setup.gpu.memory_bytes

    def to_dict(self) -> dict:
        tokens = self.setup.image_tokens()
        return {
            "model": self.setup.model.name,
            "settings": self.setup.describe(),
            "params": self.params,
            "trainable_params": self.trainable_params,
            "tokens": {
                "vision_tokens_per_sample": self.setup.vision_tokens_per_sample,
                "vision_patches_per_sample": self.setup.vision_patches_per_sample,
                "special_tokens_per_sample": self.setup.special_tokens_per_sample,
                "seq_len": self.setup.seq_len,
                "images": [t.to_dict() for t in tokens],
                # only with videos, so that the records of image-only setups stay as they were
                **({"videos": [t.to_dict() for t in self.setup.video_tokens()]} if self.setup.videos else {}),
            },
            "peak_bytes": self.peak_bytes,
            "allocated_peak_bytes": self.allocated_peak_bytes,
            "peak_phase": self.peak_phase,
            "phase_allocated_bytes": self.phase_allocated_bytes,
            "breakdown_bytes": self.breakdown_bytes,
            "cpu_ram_bytes": self.cpu_ram_bytes,
            "cpu_breakdown_bytes": self.cpu_breakdown_bytes,
            "gpu": {"name": self.setup.gpu.name, "memory_bytes": self.setup.gpu.memory_bytes},
            "fits": self.fits,
            "allocator": self.allocator,
        }


def param_summary(setup: TrainSetup) -> tuple[dict[str, int], dict[str, int]]:
    """Parameters per component, and the trainable ones (LoRA adapters counted where they attach). Memoized on the
    spec object and the settings read (fresh dicts each call)."""
    key = (id(setup.model), setup.method, setup.vision, setup.projector, setup.language, setup.lora, setup.oft,
           setup.freeze_trainable_layers)
    hit = _PARAM_SUMMARIES.get(key)
    if hit is None or hit[0] is not setup.model:
        if len(_PARAM_SUMMARIES) >= 4096:
            _PARAM_SUMMARIES.clear()
        hit = _PARAM_SUMMARIES[key] = (setup.model, *_param_summary(setup))
    return dict(hit[1]), dict(hit[2])


_PARAM_SUMMARIES: dict[tuple, tuple] = {}


def _param_summary(setup: TrainSetup) -> tuple[dict[str, int], dict[str, int]]:
    inventories = model_inventory(setup.model)
    params = {name: inv.params for name, inv in inventories.items()}
    params["total"] = sum(params.values())
    trainable = {}
    for name, inv in inventories.items():
        mode = setup.trains[name]
        if mode is Train.FULL:
            count = inv.params
            if name == LANGUAGE and setup.method == "freeze":
                per_layer = sum(l.params for l in inv.layer_linears) + _layer_other(setup)
                count = per_layer * min(setup.freeze_trainable_layers, setup.model.text.num_layers)
            trainable[name] = count
        elif mode is Train.LORA and setup.method == "oft":
            targets = setup.lora.targets
            trainable[name] = sum(linear.count * _oft_params(setup, linear.in_features) for linear in inv.linears
                                  if linear.lora_all and ("all" in targets or linear.name in targets))
        elif mode is Train.LORA:
            targets = setup.lora.targets
            trainable[name] = sum(
                linear.count * setup.lora.rank * (linear.in_features + linear.out_features)
                + (linear.count * linear.out_features if setup.lora.dora else 0)
                for linear in inv.linears
                if linear.lora_all and ("all" in targets or linear.name in targets))
        else:
            trainable[name] = 0
    trainable["total"] = sum(trainable.values())
    return params, trainable


def _oft_params(setup: TrainSetup, in_features: int) -> int:
    """peft OFT: one (blocks, b(b-1)/2) skew-symmetric parameter per adapted linear (OFTLayer.update_layer)."""
    blocks, size = setup.oft.blocks(in_features)
    return blocks * size * (size - 1) // 2


def _layer_other(setup: TrainSetup) -> int:
    from ..modules import text_layer_other_params

    return text_layer_other_params(setup.model.text)


def _largest_module_params(setup: TrainSetup) -> int:
    """DeepSpeed's `largest_layer_params`: the most parameters any single module owns (embedding, lm_head, ...)."""
    hit = _LARGEST.get(id(setup.model))
    if hit is not None and hit[0] is setup.model:
        return hit[1]
    t = setup.model.text
    largest = (t.vocab_size + t.extra_embedding_rows) * t.hidden_size
    for inv in model_inventory(setup.model).values():
        for linear in inv.linears:
            largest = max(largest, linear.in_features * linear.out_features + linear.out_features * linear.bias)
    if len(_LARGEST) >= 256:
        _LARGEST.clear()
    _LARGEST[id(setup.model)] = (setup.model, largest)  # the spec kept alive: its id is not reused meanwhile
    return largest


_LARGEST: dict[int, tuple] = {}


def estimate(setup: TrainSetup) -> Estimate:
    """Per-GPU peak device memory of one step of `setup`: the live tensors at the peak (the symbolic simulation,
    with ZeRO / DDP states), the CUDA overheads outside the caching allocator, and `cuda/allocator_reserve`, what
    the caching allocator holds beyond the live tensors: the step's full-depth allocation sequence replayed through
    the model of PyTorch's caching allocator (allocator.py; with `setup.expandable_segments` as
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True). Searches over many setups (plan, tables) bound the peak from
    below first with `peak_floor_bytes`, which needs no replay."""
    live = _live(setup)
    outside = overheads.CUDA_CONTEXT_BYTES + (overheads.NCCL_BYTES if setup.world_size > 1 else 0)
    reserved, allocator = _reserved(setup, live.allocated_peak, outside, setup.expandable_segments)
    breakdown = dict(live.breakdown)
    breakdown["cuda/context"] = overheads.CUDA_CONTEXT_BYTES
    breakdown["cuda/cublas_workspace"] = overheads.cublas_workspace_bytes(setup.gpu.name)
    breakdown["cuda/allocator_reserve"] = reserved
    if setup.world_size > 1:
        breakdown["cuda/nccl_buffers"] = overheads.NCCL_BYTES
    breakdown = {k: v for k, v in sorted(breakdown.items()) if v}
    peak = sum(breakdown.values())
    assert peak == live.allocated_peak + breakdown["cuda/cublas_workspace"] + reserved + outside
    assert peak >= peak_floor_bytes(setup)
    return Estimate(setup, live.params, live.trainable, live.peak_phase, live.allocated_peak, peak, breakdown,
                    live.phase_allocated, live.cpu_ram, live.cpu_breakdown, allocator)


def peak_floor_bytes(setup: TrainSetup) -> int:
    """A lower bound of `estimate(setup).peak_bytes` that needs no caching-allocator replay: the live tensors at the
    peak, the cuBLAS workspaces and the overheads outside the allocator, i.e. the peak with `cuda/allocator_reserve`
    at 0. The reserve is never negative (the replayed reserved peak holds at least the allocated peak, which holds at
    least the live bytes: blocks are rounded up, never down; `_reserved` asserts it), so a setup whose floor is over
    a budget does not fit it. Plan and tables search micro-batches and GPU counts on this floor and replay only the
    few setups at the boundary."""
    live = _live(setup)
    outside = overheads.CUDA_CONTEXT_BYTES + (overheads.NCCL_BYTES if setup.world_size > 1 else 0)
    return live.allocated_peak + overheads.cublas_workspace_bytes(setup.gpu.name) + outside


def host_ram_bytes(setup: TrainSetup) -> int:
    """`estimate(setup).cpu_ram_bytes` without the replay (host RAM does not depend on the caching allocator)."""
    return _live(setup).cpu_ram


@dataclass
class _Live:
    """Everything of an estimate but the reserved memory: parameters, the live bytes per phase, host RAM."""

    params: dict[str, int]
    trainable: dict[str, int]
    peak_phase: str
    allocated_peak: int
    breakdown: dict[str, int]
    phase_allocated: dict[str, int]
    cpu_ram: int
    cpu_breakdown: dict[str, int]


def _live(setup: TrainSetup) -> _Live:
    """Memoized on the setup (frozen, hashable): `peak_floor_bytes` and `estimate` of one setup compute it once."""
    result = _LIVE.get(setup)
    if result is None:
        params, trainable = param_summary(setup)
        sim = simulate_extrapolated(setup)
        phases = {}
        fsdp = None
        if setup.sharding == "fsdp":  # FSDP2 re-partitions the single-GPU states per phase (fsdp.py)
            single = sim.phase_breakdown["optimizer"]
            fsdp = fsdp_states(setup, single_gpu_optimizer_bytes(single), single.get("optimizer/step_counters", 0))
            sim = simulate_extrapolated(activation_setup(setup))
        for phase in PHASES:
            if phase not in sim.phase_breakdown:
                continue
            if fsdp is not None:
                phases[phase] = fsdp_breakdown(sim.phase_breakdown[phase], phase, fsdp)
                continue
            phases[phase] = _distributed(setup, dict(sim.phase_breakdown[phase]), params, trainable)
        allocated = {phase: sum(b.values()) for phase, b in phases.items()}
        peak_phase = max(allocated, key=allocated.get)
        cpu = _cpu_ram(setup, params, trainable)
        if fsdp is not None:
            cpu.update(fsdp.cpu_per_node)
        if sim.host_peak_bytes:  # offloaded checkpointing: every GPU process's checkpointed inputs in host RAM
            cpu["host/offloaded_checkpoints"] = setup.num_gpus * sim.host_peak_bytes
        result = _Live(params, trainable, peak_phase, allocated[peak_phase], dict(phases[peak_phase]), allocated,
                       sum(cpu.values()), cpu)
        if len(_LIVE) >= _LIVE_SIZE:
            _LIVE.pop(next(iter(_LIVE)))
        _LIVE[setup] = result
    return result


_LIVE: dict[TrainSetup, _Live] = register_memo({})
_LIVE_SIZE = 4096


# Reserved memory: the caching-allocator replay -----------------------------------------------------------------------


def reserved_replay(setup: TrainSetup, expandable_segments: bool = False,
                    capacity_bytes: int | None = None) -> tuple[ReplayResult, int]:
    """Replay the step's allocation sequence at the real depth through the caching-allocator model: every storage of
    the symbolic step in the order the real code allocates and frees it (sim.py's allocation log). Returns the replay
    and the simulation's live-tensor peak.

    The replay runs the full-depth simulation: reserved memory is not affine in the layer counts (a layer's tensors
    may fit in cached blocks or need new segments, in patterns with periods of several layers), so the 2-and-3-layer
    extrapolation of `simulate_extrapolated` does not carry over to it (docs/memory-model.md, "Reserved memory: the
    caching allocator"). Memoized, with unlimited capacity (also in the persistent cache) and under a capacity; the
    logs of the last few setups are kept for the replays under a GPU's capacity."""
    key = (simulation_key(setup), expandable_segments)
    if capacity_bytes is None:
        answer = _known_replay(key)
        if answer is None:
            log, live_peak = _step_log(setup, key[0])
            answer = replay(log, None, expandable_segments), live_peak
            _remember_unlimited(key, answer)
        return answer
    log, live_peak = _step_log(setup, key[0])
    return _limited_replay(key, log, capacity_bytes), live_peak


def _known_replay(key: tuple) -> tuple[ReplayResult, int] | None:
    """The unlimited replay of `key` from the memo or the persistent cache (planner/cache.py), or None."""
    if key in _REPLAYS:
        return _REPLAYS[key]
    if not _step.SHORTCUTS:
        return None
    stored = cache.load(REPLAY_NAMESPACE, key)
    try:
        answer = ReplayResult(**stored[0]), int(stored[1])
    except (TypeError, ValueError, KeyError, IndexError):  # absent (None) or malformed
        return None
    _remember_replay(key, answer)
    return answer


def _step_log(setup: TrainSetup, sim_key: tuple) -> tuple[list, int]:
    """The allocation log of the full-depth simulation of `setup` and its live-tensor peak (the last few kept)."""
    hit = _LOGS.get(sim_key)
    if hit is not None:
        return hit
    hit = simulate_log(setup)  # `simulate(setup)` under `recording_allocations`, without the peaks' breakdowns
    if len(_LOGS) >= _LOGS_SIZE:
        _LOGS.pop(next(iter(_LOGS)))
    _LOGS[sim_key] = hit
    return hit


def _remember_unlimited(key: tuple, answer: tuple[ReplayResult, int]) -> None:
    _remember_replay(key, answer)
    if _step.SHORTCUTS:
        cache.store(REPLAY_NAMESPACE, key, [dataclasses.asdict(answer[0]), answer[1]])


def _limited_replay(key: tuple, log: list, capacity: int) -> ReplayResult:
    """The replay of `key`'s log under `capacity` bytes, memoized."""
    limited_key = (key, capacity)
    result = _LIMITED.get(limited_key)
    if result is None:
        result = replay(log, capacity, key[1])
        if len(_LIMITED) >= _REPLAYS_SIZE:
            _LIMITED.pop(next(iter(_LIMITED)))
        _LIMITED[limited_key] = result
    return result


def _remember_replay(key: tuple, answer: tuple[ReplayResult, int]) -> None:
    if len(_REPLAYS) >= _REPLAYS_SIZE:
        _REPLAYS.pop(next(iter(_REPLAYS)))
    _REPLAYS[key] = answer


REPLAY_NAMESPACE = "replay"
_REPLAYS: dict[tuple, tuple[ReplayResult, int]] = register_memo({})
_REPLAYS_SIZE = 4096
_LOGS: dict[tuple, tuple[list, int]] = register_memo({})
_LOGS_SIZE = 4
_LIMITED: dict[tuple, ReplayResult] = register_memo({})  # ((simulation key, expandable), capacity) -> replay


def cublas_reserved_bytes(gpu_name: str, expandable_segments: bool = False) -> int:
    """The segments the cuBLAS workspaces take: they are allocated through the caching allocator (torch >= 2.0,
    aten/src/ATen/cuda/CublasHandlePool.cpp `getNewWorkspace`: `c10::cuda::CUDACachingAllocator::get()->allocate`)
    when the first matmul of each thread runs and are kept for the process's life, so they hold their own segments
    (on Hopper two 32 MiB ones; elsewhere both 8.125 MiB workspaces share one 20 MiB segment). Replayed apart from
    the step: what they leave free in their segment (3.75 MiB off Hopper) is not offered to the step's tensors."""
    key = (gpu_name, expandable_segments)
    if key not in _CUBLAS_RESERVED:  # memoized: every estimate asks, a table's rows for a handful of GPU types
        workspace = overheads.cublas_workspace_bytes(gpu_name) // overheads.CUBLAS_WORKSPACES
        events = [(i, workspace) for i in range(overheads.CUBLAS_WORKSPACES)]
        _CUBLAS_RESERVED[key] = replay(events, expandable_segments=expandable_segments).reserved_peak_bytes
    return _CUBLAS_RESERVED[key]


_CUBLAS_RESERVED: dict[tuple[str, bool], int] = {}


def _reserved(setup: TrainSetup, allocated_peak: int, outside: int, expandable_segments: bool) -> tuple[int, dict]:
    """`cuda/allocator_reserve`: what the caching allocator holds beyond the live tensors at the peak,
    max_memory_reserved - (live tensors + cuBLAS workspaces), from the replay. ZeRO / DDP states that the estimate adds
    analytically (`_distributed`) shift the allocated peak but are not replayed: the replayed single-GPU sequence
    gives the reserve, and the capacity it runs under is shifted by the same amount.

    The replay first runs with unlimited memory. When that reserved peak would not fit the GPU but the live peak
    would, it runs again under the GPU's capacity: the allocator then frees its cached segments and retries before
    running out of memory (`malloc`), and the peak is what it reserved under that limit. (A setup not replayed yet
    is replayed under the capacity first, which gives the same answers with one replay where the capacity is
    reached: see below.)"""
    cublas = overheads.cublas_workspace_bytes(setup.gpu.name)
    cublas_reserved = cublas_reserved_bytes(setup.gpu.name, expandable_segments)
    key = (simulation_key(setup), expandable_segments)
    unlimited, limited = _known_replay(key), None
    if unlimited is None:
        # Not replayed yet: replay under the capacity first. Up to the first new segment past the capacity the
        # replay under it is the unlimited one, so one that never reaches the capacity (no retry) is the unlimited
        # replay, and one that does is the replay the estimate needs (only when it runs out of memory is the
        # unlimited one needed too): one replay instead of two where the capacity is reached
        log, live_peak = _step_log(setup, key[0])
        capacity = setup.gpu.memory_bytes - outside - (allocated_peak - live_peak) - cublas_reserved
        if capacity >= live_peak:
            limited = _limited_replay(key, log, capacity)
            if not limited.retries and not limited.oom:
                unlimited, limited = (limited, live_peak), None
                _remember_unlimited(key, unlimited)
        if unlimited is None and (limited is None or limited.oom):
            unlimited = reserved_replay(setup, expandable_segments)
    if unlimited is not None:
        result, live_peak = unlimited
    shift = allocated_peak - live_peak  # analytic ZeRO / DDP terms (0 on one GPU without ZeRO)
    capacity = setup.gpu.memory_bytes - outside - shift - cublas_reserved
    if limited is None and result.reserved_peak_bytes > capacity >= live_peak:
        limited, _ = reserved_replay(setup, expandable_segments, capacity)
    if limited is not None and not limited.oom:
        result = limited
    info = {"reserve": "replay", "expandable_segments": expandable_segments,
            "reserved_peak_bytes": result.reserved_peak_bytes + shift + cublas_reserved,
            "reserved_minus_allocated_at_reserved_peak_bytes": result.fragmentation_bytes,
            "events": result.events, "oom_event": None if limited is None else limited.oom_event,
            "retries": 0 if limited is None else limited.retries}
    reserve = result.reserved_peak_bytes - live_peak + cublas_reserved - cublas
    # never negative: reserved >= allocated (blocks of segments) >= live bytes (each rounded up), and the cuBLAS
    # segments hold at least the workspaces; `peak_floor_bytes` (the searches' lower bound) relies on it
    assert reserve >= 0, (result, live_peak)
    return reserve, info


def _distributed(setup: TrainSetup, breakdown: dict[str, int], params, trainable) -> dict[str, int]:
    """Replace the single-GPU model states of the simulation by their DDP / ZeRO per-GPU form."""
    if setup.zero:
        for key in [k for k in breakdown if k.startswith(("optimizer/", "gradients/"))]:
            breakdown.pop(key)
        half = 2 if setup.precision != "fp32" else 4
        total = params["total"]
        if setup.method == "qlora" and setup.zero == 3:  # 4-bit weights in half-dtype storage (fsdp.py)
            total = zero3_partitioned_params(setup, total)
        elif setup.method == "qlora":  # ZeRO-1/2 leave the quantized weights packed; the rest in the half dtype
            total -= quantized_linear_params(setup)
        states = deepspeed_model_states(setup, total, trainable["total"], _largest_module_params(setup), half)
        if setup.zero == 3 or states.gpu.get("weights/half") is not None:
            # ZeRO-1/2 replace the base weights by their half-dtype copy; the simulation already holds the LoRA
            # adapters in the half dtype under ZeRO (blocks.py), and `params` counts the base model only
            replaced = ("weights/", "adapters/") if setup.zero == 3 else ("weights/",)
            for key in [k for k in breakdown if k.startswith(replaced)]:
                breakdown.pop(key)
        for key, value in states.gpu.items():
            breakdown[key] = breakdown.get(key, 0) + value
        breakdown["zero/reduce_bucket"] = reduce_bucket_bytes(setup, half)
        if setup.method == "qlora" and setup.zero == 3:  # attributes of the 4-bit weights: not partitioned
            breakdown["weights/quant_state"] = quant_state_bytes(setup)
        elif setup.method == "qlora":
            breakdown["weights/quantized"] = quantized_weight_bytes(setup)
    elif setup.world_size > 1:
        grads = sum(v for k, v in breakdown.items() if k.startswith("gradients/"))
        if not grads:  # the peak phase may precede gradients; DDP's buckets exist from the start
            grads = trainable["total"] * (2 if setup.precision == "pure-bf16" else 4)
        breakdown["ddp/grad_buckets"] = ddp_bucket_bytes(grads)
    return breakdown


def _cpu_ram(setup: TrainSetup, params, trainable) -> dict[str, int]:
    """Host RAM per node: one process per GPU, plus offloaded model states."""
    cpu = {"host/processes": setup.num_gpus * overheads.PROCESS_HOST_BYTES}
    if setup.zero and setup.offload != "none":
        half = 2 if setup.precision != "fp32" else 4
        states = deepspeed_model_states(setup, params["total"], trainable["total"], _largest_module_params(setup),
                                        half)
        cpu.update(states.cpu_per_node)
    return cpu
