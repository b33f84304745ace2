"""One training step on symbolic tensors: inputs, vision tower, projector, language model, loss, backward,
gradient clipping and the optimizer step, as the HF Trainer (with accelerate) runs them.

`simulate(setup)` returns the peak of each phase with the live bytes per category at that peak, exactly the
quantities the tracer measures on the real modeling code.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field, fields

from ..setup import TrainSetup
from . import liger
from .families import model_for
from .sdpa import sdpa_class
from .sim import Engine, T
from .stacks import input_embeddings_hooked

PHASES = ("forward", "loss", "backward", "optimizer")


@dataclass
class SimResult:
    phase_peaks: dict[str, int]
    phase_breakdown: dict[str, dict[str, int]]
    params_bytes: dict[str, int] = field(default_factory=dict)
    host_peak_bytes: int = 0  # checkpointed inputs held in host RAM (offloaded checkpointing), at their peak

    @property
    def peak_phase(self) -> str:
        return max(self.phase_peaks, key=self.phase_peaks.get)


# The step ---------------------------------------------------------------------------------------------------------


BASE_LAYERS = 2  # layers per type simulated before extrapolating (the first layer of a stack is special)


# Settings the simulated step does not read: the cluster (GPU type and count, what DeepSpeed offloads and its
# buffers: zero.py and estimate.py add those analytically), the caching allocator's settings (the replay of the step's
# allocations reads them: estimate.py), and what is recorded only for launch configs. ZeRO
# matters to the simulation only as on/off (gradients reduced into buckets instead of kept).
SIMULATION_IGNORES = ("gpu", "num_gpus", "num_nodes", "offload", "ds_reduce_bucket_size", "ds_overlap_comm",
                      "sharding", "fsdp",  # FSDP re-partitions the single-GPU states analytically (fsdp.py)
                      "packing", "expandable_segments")


def simulation_key(setup: TrainSetup) -> tuple:
    """What the simulation of `setup` depends on: setups with equal keys have equal simulations."""
    # the GPU enters only through the attention kernels it runs (sdpa.py): GPUs that run the same ones share
    return tuple((f.name, bool(setup.zero) if f.name == "zero" else getattr(setup, f.name))
                 for f in fields(setup) if f.name not in SIMULATION_IGNORES) + (("sdpa", sdpa_class(setup.gpu.name)),)


def simulate_extrapolated(setup: TrainSetup) -> SimResult:
    """`simulate` at a few layers per type plus one more per type, extrapolated linearly per segment to the real
    layer counts (each segment's peak and breakdown is affine in the counts; their maximum is not). Equal to the
    full simulation (tests/test_memory_sim.py) and an order of magnitude faster for deep models. Memoized on
    `simulation_key`, so estimates that differ only in the cluster (plans, tables) simulate once."""
    key = simulation_key(setup)
    result = _MEMO.get(key)
    if result is None:
        result = _simulate_extrapolated(setup)
        if len(_MEMO) >= _MEMO_SIZE:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = result
    return result


_MEMO: dict[tuple, SimResult] = {}
_MEMO_SIZE = 8192


def _simulate_extrapolated(setup: TrainSetup) -> SimResult:
    from .families import base_layer_counts, layer_counts

    real = layer_counts(setup.model)
    base = base_layer_counts(setup, real, BASE_LAYERS)
    if all(n <= base[kind] + 1 for kind, n in real.items()) or setup.vision_gradient_checkpointing is not None:
        # Per-component checkpointing (a checkpointed language model over an un-checkpointed trainable vision tower)
        # moves the backward peak within a segment as layers are added (at 2-3 text layers it sits where the vision
        # activations dominate, at full depth where the language model's gradients have piled up): the segments are
        # not affine in the layer counts there, so the full depth is simulated (0.24 s for Qwen2.5-VL-7B)
        return simulate(setup)
    first = simulate(setup, base)
    segments = {k: (v[0], dict(v[1])) for k, v in first.segments.items()}
    host = first.host_peak_bytes
    for kind, n in real.items():
        if n <= base[kind]:
            continue
        extra = n - base[kind]
        bigger = simulate(setup, dict(base, **{kind: base[kind] + 1}))
        host += extra * (bigger.host_peak_bytes - first.host_peak_bytes)
        other = bigger.segments
        for key, (total, categories) in list(segments.items()):
            o_total, o_categories = other[key]
            b_total, b_categories = first.segments[key]
            total += extra * (o_total - b_total)
            for cat in set(categories) | set(o_categories):
                categories[cat] = categories.get(cat, 0) + extra * (o_categories.get(cat, 0)
                                                                    - b_categories.get(cat, 0))
            segments[key] = (total, categories)
    peaks: dict[str, int] = {}
    breakdown: dict[str, dict[str, int]] = {}
    for key, (total, categories) in segments.items():
        phase = key.split("/")[0]
        if phase not in peaks or total > peaks[phase]:
            peaks[phase] = total
            breakdown[phase] = {k: v for k, v in categories.items() if v}
    result = SimResult({p: peaks[p] for p in PHASES if p in peaks}, breakdown, host_peak_bytes=host)
    result.segments = segments
    return result


def simulate(setup: TrainSetup, counts: dict[str, int] | None = None, detail: bool = False) -> SimResult:
    family = setup.model.family
    builder = model_for(family)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the simulation frees by reference counting alone, as deterministically as torch does
    try:
        return _simulate(builder, setup, counts, detail)
    finally:
        if gc_was_enabled:
            gc.enable()


def _simulate(builder, setup: TrainSetup, counts, detail: bool) -> SimResult:
    e = Engine(detail)
    e.gpu_name = setup.gpu.name
    e.reduce_grads = bool(setup.zero)
    e.input_grads = input_embeddings_hooked(setup)
    e.liger = liger.swaps(setup)
    model = builder(e, setup, counts)
    # DeepSpeed keeps its own partitioned states (zero.py); the simulation holds the single-GPU torch ones
    states = [] if setup.zero else _optimizer_states(e, setup, model)
    inputs = model.inputs(e)
    micro_steps = min(setup.gradient_accumulation_steps, 2)
    for _ in range(micro_steps):
        e.set_phase("forward")
        loss = model.forward(e, inputs)
        e.backward(loss)
        del loss
    e.set_phase("optimizer")
    e.scope = "optimizer"
    if not setup.zero:
        _optimizer_step(e, setup, model)
    else:
        e.new(1, "fp32", name="ds_step")  # the optimizer phase exists; DeepSpeed's own step works in place
    del states
    e._flush()
    peaks = {phase: e.phase_peaks[phase][0] for phase in PHASES if phase in e.phase_peaks}
    breakdown = {phase: {k: v for k, v in e.phase_peaks[phase][1].items() if v} for phase in peaks}
    result = SimResult(peaks, breakdown, host_peak_bytes=e.host_peak_bytes)
    result.blocks = e.phase_blocks
    result.segment_peaks = {k: v[0] for k, v in e.segment_peaks.items()}
    result.segments = {k: v for k, v in e.segment_peaks.items() if k.split("/")[0] in PHASES}
    result.segment_blocks = e.segment_blocks
    return result


def _trainable(model) -> list:
    """Trainable parameters that receive a gradient. A family lists in `unused_params` those the loss never reaches
    (LLaVA's CLIP layers after `vision_feature_layer`, its post_layernorm): no gradient, so no optimizer state."""
    unused = {id(p) for p in getattr(model, "unused_params", ())}
    return [p for p in model.e.params if p.trainable and id(p) not in unused]


def _optimizer_states(e: Engine, setup: TrainSetup, model) -> list[T]:
    """Persistent optimizer state (steady state: created at the first step and kept).

    - torch AdamW (optim/adam.py `_init_group`): exp_avg and exp_avg_sq in the parameter's dtype, and with fused a
      0-d fp32 `step` per parameter on the device (one 512-byte block each).
    - bitsandbytes AdamW8bit (optim/optimizer.py `Optimizer2State.init_state`): parameters under 4096 elements
      keep two fp32 states; larger ones two uint8 states plus an fp32 absmax per 256-element block (bnb >= 0.44).
      The paged variant allocates the same bytes in CUDA unified memory, which the driver can page out to the host.
    - transformers Adafactor (optimization.py, beta1=None): for a tensor of 2 or more dims the factored second
      moment, exp_avg_sq_row of shape[:-1] and exp_avg_sq_col of shape[:-2] + shape[-1:] (a 4-D convolution weight
      too), a full exp_avg_sq for vectors, all fp32 (`.to(grad)` of the fp32 gradient); and `state["RMS"]`, a 0-d
      fp32 tensor per parameter.
    - SGD (momentum 0): nothing.
    """
    states = []
    for p in _trainable(model):
        if setup.optimizer in ("adamw", "adamw-foreach"):
            for state in ("exp_avg", "exp_avg_sq"):
                states.append(e.new(p.numel, p.dtype, name=f"{state}:{p.name}", category="optimizer/adam_states"))
            if setup.optimizer == "adamw":
                states.append(e.new(1, "fp32", name=f"step:{p.name}", category="optimizer/step_counters"))
        elif setup.optimizer in ("adamw-8bit", "paged-adamw-8bit"):
            category = "optimizer/paged_8bit_states" if setup.optimizer.startswith("paged") else \
                "optimizer/8bit_states"
            if p.numel < 4096:
                states += [e.new(p.numel, "fp32", name=f"state:{p.name}", category=category) for _ in range(2)]
            else:
                blocks = -(-p.numel // 256)
                states += [e.new(p.numel, "uint8", name=f"state:{p.name}", category=category) for _ in range(2)]
                states += [e.new(blocks, "fp32", name=f"absmax:{p.name}", category=category) for _ in range(2)]
        elif setup.optimizer == "adafactor":
            rows, cols = _matrix_shape(p)
            if cols:
                states.append(e.new(rows, "fp32", name=f"exp_avg_sq_row:{p.name}", category="optimizer/adafactor"))
                states.append(e.new(cols, "fp32", name=f"exp_avg_sq_col:{p.name}", category="optimizer/adafactor"))
            else:
                states.append(e.new(p.numel, "fp32", name=f"exp_avg_sq:{p.name}", category="optimizer/adafactor"))
            p.rms = e.new(1, "fp32", name=f"RMS:{p.name}", category="optimizer/adafactor")
    return states


def _matrix_shape(p) -> tuple[int, int]:
    """The elements of Adafactor's factored row and column states of a parameter of 2 or more dims (shape[:-1] and
    shape[:-2] + shape[-1:]; a matrix's rows and columns), or (numel, 0) for vectors."""
    if not p.shape or len(p.shape) < 2:
        return p.numel, 0
    return p.numel // p.shape[-1], p.numel // p.shape[-2]


def _optimizer_step(e: Engine, setup: TrainSetup, model) -> None:
    """clip_grad_norm_ (foreach: one 0-d norm per gradient, stacked) when max_grad_norm > 0 (the HF Trainer skips
    clipping otherwise: `if args.max_grad_norm is not None and args.max_grad_norm > 0`), optimizer.step,
    zero_grad(set_to_none)."""
    trainable = [p for p in _trainable(model) if p.grad is not None]
    if setup.max_grad_norm > 0:
        norms = [e.new(1, "fp32", name="grad_norm") for _ in trainable]
        stacked = e.new(len(norms), "fp32", name="stack")
        total = e.new(1, "fp32", name="total_norm")
        del norms, stacked
        coef = e.new(1, "fp32", name="clip_coef")
        clamped = e.new(1, "fp32", name="clip_coef_clamped")
        del coef, clamped, total
    if setup.optimizer == "adamw-foreach":
        # _multi_tensor_adam: exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs), per parameter group
        for group in _param_groups(trainable):
            temp = [e.new(p.numel, p.dtype, name="exp_avg_sq_sqrt") for p in group]
            del temp
    elif setup.optimizer == "adafactor":
        loop_locals: dict[str, T | None] = {}  # Adafactor.step's loop variables: they outlive their iteration
        for group in _param_groups(model.optimizer_order(trainable)):
            for p in group:
                _adafactor_param(e, p, loop_locals)
        del loop_locals  # the last `grad`, `p_data_fp32` and `update` die as step() returns
    for p in trainable:
        p.grad = None


def _adafactor_param(e: Engine, p, local: dict) -> None:
    """One iteration of transformers' Adafactor.step loop (beta1=None, weight_decay 0), tensor by tensor. Its locals
    `grad`, `p_data_fp32` and `update` (held in `local` across iterations) keep the previous parameter's tensors until
    they are rebound, so the previous `update` is alive while this one's `grad**2 + eps` is computed."""
    half = p.grad.dtype != "fp32"
    local["grad"] = None  # `grad = p.grad`
    grad = e.new(p.numel, "fp32", name="adafactor_grad_fp32") if half else None  # grad.float()
    local["grad"] = grad
    local["p_data_fp32"] = None  # `p_data_fp32 = p`
    local["p_data_fp32"] = e.new(p.numel, "fp32", name="adafactor_p_fp32") if half else None
    norm = e.new(1, "fp32", name="norm")  # state["RMS"] = _rms(p_data_fp32): norm / sqrt(numel)
    rms = e.new(1, "fp32", name=f"RMS:{p.name}", category="optimizer/adafactor")
    del norm
    p.rms = rms
    del rms
    square = e.new(p.numel, "fp32", name="grad_pow_2")
    update = e.new(p.numel, "fp32", name="adafactor_update")  # (grad**2) + eps
    del square
    local["update"] = update
    rows, cols = _matrix_shape(p)
    if cols:
        for size in (rows, cols):  # exp_avg_sq_row/col.mul_(beta2t).add_(update.mean(dim=-1 / -2))
            mean = e.new(size, "fp32", name="update_mean")
            del mean
        # _approx_sq_grad: (row / row.mean(-1, keepdim)).rsqrt_(), col.unsqueeze(-2).rsqrt(), their product
        row_mean = e.new(rows // (p.numel // cols), "fp32", name="row_mean")
        r_factor = e.new(rows, "fp32", name="r_factor")
        del row_mean
        c_factor = e.new(cols, "fp32", name="c_factor")
        approx = e.new(p.numel, "fp32", name="adafactor_update")
        del r_factor, c_factor
    else:  # exp_avg_sq.mul_(beta2t).add_(update); exp_avg_sq.rsqrt().mul_(grad)
        approx = e.new(p.numel, "fp32", name="adafactor_update")
    del update
    local["update"] = approx
    # update.div_((_rms(update) / clip_threshold).clamp_(min=1.0)): three 0-d temporaries, two alive at once
    norm = e.new(1, "fp32", name="norm")
    scaled = e.new(1, "fp32", name="rms")
    del norm
    clip = e.new(1, "fp32", name="rms_clip")
    del scaled, clip
    negated = e.new(p.numel, "fp32", name="neg_update")  # p_data_fp32.add_(-update)
    del negated, approx


def _param_groups(params: list) -> list[list]:
    """Trainer.create_optimizer: weight-decay params (not bias/norm) and the rest, in two groups."""
    decay = [p for p in params if not (p.name.endswith(".bias") or "norm" in p.name)]
    rest = [p for p in params if p not in decay]
    return [g for g in (decay, rest) if g]


