"""`estimate(setup)`: per-GPU peak device memory of one training step, its phase and an itemised breakdown.

The live-tensor part comes from `step.simulate` (the symbolic re-execution of the modeling code); model states are
re-partitioned for ZeRO and DDP (`zero.py`); the device overheads outside live tensors are the named constants of
`overheads.py`. `breakdown_bytes` sums to `peak_bytes` exactly (asserted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..modules import LANGUAGE, model_inventory
from ..setup import Train, TrainSetup
from . import overheads
from .step import PHASES, simulate_extrapolated
from .zero import ddp_bucket_bytes, deepspeed_model_states, reduce_bucket_bytes

PERSISTENT_PREFIXES = ("weights/", "adapters/", "optimizer/", "inputs/", "gradients/", "zero", "ddp/")


@dataclass
class Term:
    name: str
    bytes: int
    explanation: str = ""


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
    explanations: dict[str, str] = field(default_factory=dict)

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
        }


def param_summary(setup: TrainSetup) -> tuple[dict[str, int], dict[str, int]]:
    """Parameters per component, and the trainable ones (LoRA adapters counted where they attach)."""
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


def _layer_other(setup: TrainSetup) -> int:
    from ..modules import text_layer_other_params

    return text_layer_other_params(setup.model.text)


def _largest_module_params(setup: TrainSetup) -> int:
    """DeepSpeed's `largest_layer_params`: the most parameters any single module owns (embedding, lm_head, ...)."""
    t = setup.model.text
    largest = (t.vocab_size + t.extra_embedding_rows) * t.hidden_size
    for inv in model_inventory(setup.model).values():
        for linear in inv.linears:
            largest = max(largest, linear.in_features * linear.out_features + linear.out_features * linear.bias)
    return largest


def estimate(setup: TrainSetup) -> Estimate:
    params, trainable = param_summary(setup)
    sim = simulate_extrapolated(setup)
    explanations: dict[str, str] = {}
    phases = {}
    for phase in PHASES:
        if phase not in sim.phase_breakdown:
            continue
        phases[phase] = _distributed(setup, dict(sim.phase_breakdown[phase]), params, trainable, explanations)
    allocated = {phase: sum(b.values()) for phase, b in phases.items()}
    peak_phase = max(allocated, key=allocated.get)
    breakdown = dict(phases[peak_phase])
    allocated_peak = allocated[peak_phase]
    transient = sum(v for k, v in breakdown.items() if not k.startswith(PERSISTENT_PREFIXES))
    breakdown["cuda/context"] = overheads.CUDA_CONTEXT_BYTES
    breakdown["cuda/cublas_workspace"] = overheads.cublas_workspace_bytes(setup.gpu.name)
    breakdown["cuda/allocator_reserve"] = int(transient * overheads.ALLOCATOR_FRAGMENTATION)
    if setup.world_size > 1:
        breakdown["cuda/nccl_buffers"] = overheads.NCCL_BYTES
    breakdown = {k: v for k, v in sorted(breakdown.items()) if v}
    peak = sum(breakdown.values())
    assert peak == sum(breakdown.values())
    cpu = _cpu_ram(setup, params, trainable)
    return Estimate(setup, params, trainable, peak_phase, allocated_peak, peak, breakdown, allocated,
                    sum(cpu.values()), cpu, explanations)


def _distributed(setup: TrainSetup, breakdown: dict[str, int], params, trainable, explanations) -> dict[str, int]:
    """Replace the single-GPU model states of the simulation by their DDP / ZeRO per-GPU form."""
    if setup.zero:
        for key in [k for k in breakdown if k.startswith(("optimizer/", "gradients/"))]:
            breakdown.pop(key)
        half = 2 if setup.precision != "fp32" else 4
        states = deepspeed_model_states(setup, params["total"], trainable["total"], _largest_module_params(setup),
                                        half)
        if setup.zero == 3 or states.gpu.get("weights/half") is not None:
            for key in [k for k in breakdown if k.startswith(("weights/", "adapters/"))]:
                breakdown.pop(key)
        for key, value in states.gpu.items():
            breakdown[key] = breakdown.get(key, 0) + value
        breakdown["zero/reduce_bucket"] = reduce_bucket_bytes(setup, half)
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
