"""One training step on symbolic tensors: inputs, vision tower, projector, language model, loss, backward,
gradient clipping and the optimizer step, as the HF Trainer (with accelerate) runs them.

`simulate(setup)` returns the peak of each phase with the live bytes per category at that peak, exactly the
quantities the tracer measures on the real modeling code.
"""

from __future__ import annotations

import copy
import gc
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace

from .. import cache
from ..setup import Train, TrainSetup
from . import liger, preference
from .families import model_for
from .sdpa import sdpa_class
from .sim import Engine, LogEngine, T
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
                      "packing", "expandable_segments", "pref_beta", "kto_chosen_weight", "kto_rejected_weight")


def simulation_key(setup: TrainSetup) -> tuple:
    """What the simulation of `setup` depends on: setups with equal keys have equal simulations. An fp16 setup has
    the key of its bf16 twin (both half types are 2 bytes and every branch of the simulated code treats them alike)
    except with 8-bit QLoRA, whose bitsandbytes matmul casts its input to fp16 (a copy only when it is not fp16
    already): tests/test_speed_shortcuts.py checks, for every registry model and method, that the two simulations
    are equal exactly where the keys are."""
    cached = _KEYS.get(id(setup))
    if cached is not None and cached[0] is setup:
        return cached[1]
    # the GPU enters only through the attention kernels it runs (sdpa.py): GPUs that run the same ones share
    key = tuple((f.name, _key_value(setup, f.name)) for f in fields(setup) if f.name not in SIMULATION_IGNORES) + (
        ("sdpa", sdpa_class(setup.gpu.name)),)
    if liger.swaps(setup) & liger.NORM_SWAPS:  # Liger's norm backward sizes a buffer by the GPU's SM count
        key += (("liger_sm_count", liger.sm_count(setup.gpu.name)),)
    if len(_KEYS) >= _MEMO_SIZE:
        _KEYS.clear()
    _KEYS[id(setup)] = (setup, key)
    return key


def _key_value(setup: TrainSetup, name: str):
    if name == "zero":
        return bool(setup.zero)
    if name == "precision" and SHORTCUTS and setup.precision == "fp16" and setup.quant_bits != 8:
        return "bf16"
    return getattr(setup, name)


# The exact shortcuts of `simulate_extrapolated` (each checked against the full simulation for every registry model by
# tests/test_speed_shortcuts.py); tests switch them off to get the full simulation to compare with
SHORTCUTS = True
_KEYS: dict[int, tuple] = {}  # id(setup) -> (setup, key): a setup is immutable, its key computed once


def simulate_extrapolated(setup: TrainSetup) -> SimResult:
    """`simulate` at a few layers per type plus one more per type, extrapolated linearly per segment to the real
    layer counts (each segment's peak and breakdown is affine in the counts; their maximum is not). Equal to the
    full simulation (tests/test_memory_sim.py) and an order of magnitude faster for deep models. Memoized on
    `simulation_key`, so estimates that differ only in the cluster (plans, tables) simulate once."""
    key = simulation_key(setup)
    result = _MEMO.get(key)
    if result is None:
        result = _load(key) if SHORTCUTS else None
        if result is None:
            result = _simulate_extrapolated(setup)
            if SHORTCUTS:
                _store(key, result)
        if len(_MEMO) >= _MEMO_SIZE:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = result
    return result


_MEMO: dict[tuple, SimResult] = {}
_MEMO_SIZE = 8192
CACHE_NAMESPACE = "simulation"


def _load(key: tuple) -> SimResult | None:
    """The persistent cache's result for `key` (planner/cache.py), or None."""
    value = cache.load(CACHE_NAMESPACE, key)
    try:
        peaks, breakdown, segments, host = value
        result = SimResult(dict(peaks), {phase: dict(b) for phase, b in breakdown.items()}, host_peak_bytes=host)
        result.segments = {name: (total, dict(categories)) for name, (total, categories) in segments.items()}
    except (TypeError, ValueError, AttributeError):  # absent (None) or malformed
        return None
    return result


def _store(key: tuple, result: SimResult) -> None:
    cache.store(CACHE_NAMESPACE, key, [result.phase_peaks, result.phase_breakdown, result.segments,
                                       result.host_peak_bytes])


def _simulate_extrapolated(setup: TrainSetup) -> SimResult:
    from .families import base_layer_counts, layer_counts

    real = layer_counts(setup.model)
    base = base_layer_counts(setup, real, BASE_LAYERS)
    if all(n <= base[kind] + 1 for kind, n in real.items()) or setup.vision_gradient_checkpointing is not None \
            or setup.preference:
        # Per-component checkpointing (a checkpointed language model over an un-checkpointed trainable vision tower)
        # moves the backward peak within a segment as layers are added (at 2-3 text layers it sits where the vision
        # activations dominate, at full depth where the language model's gradients have piled up): the segments are
        # not affine in the layer counts there, so the full depth is simulated (0.24 s for Qwen2.5-VL-7B). Likewise
        # DPO: the reference forward runs the layers again inside the policy's loss phase, and which of the phase's
        # visits to a segment peaks changes with depth (extrapolated, Qwen2.5-VL-7B full DPO's backward came out
        # 19 GiB under the full simulation), and KTO's three no-grad forwards after the policy's
        return simulate(setup)
    first = simulate(setup, base)
    segments = {k: (v[0], dict(v[1])) for k, v in first.segments.items()}
    host = first.host_peak_bytes
    for kind, n in real.items():
        if n <= base[kind]:
            continue
        extra = n - base[kind]
        delta, host_delta = _layer_delta(setup, base, kind, first)
        host += extra * host_delta
        for key, (total, categories) in list(segments.items()):
            d_total, d_categories = delta[key]
            total += extra * d_total
            for cat, d in d_categories.items():
                categories[cat] = categories.get(cat, 0) + extra * d
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


def _layer_delta(setup: TrainSetup, base: dict[str, int], kind: str, first: SimResult) -> tuple[dict, int]:
    """What one more layer of `kind` adds to each segment's peak and breakdown, {segment: (bytes, {category: bytes})},
    and to the host peak (offloaded checkpoint inputs): the difference of the simulations at `base` and at `base`
    plus that layer. Two exact shortcuts spare the second simulation (SHORTCUTS; each holds for the families whose
    activation model says so, and tests/test_speed_shortcuts.py holds every registry model to the full simulation):
    - a frozen vision layer (its component frozen, no `enable_input_require_grads` hook making the tower's input
      require grad: stacks.py, `BaseModel.frozen_vision_layers_add_weights_only`) builds no autograd graph, so it adds
      its weights and nothing else to every segment: the construction of the model at both counts (no step) gives
      them, shared by every micro-batch;
    - one more language-model layer adds the same to every segment whatever the image size
      (`BaseModel.text_layer_delta_shared`; without videos): the difference is shared by the setups that differ only
      in their images' sizes."""
    builder = model_for(setup.model.family)
    bigger = dict(base, **{kind: base[kind] + 1})
    if SHORTCUTS and kind.startswith("vision") and setup.vision is Train.FROZEN \
            and not input_embeddings_hooked(setup) and builder.frozen_vision_layers_add_weights_only:
        weights = _construction_delta(setup, base, bigger)
        if weights is not None:  # no graph: nothing saved, nothing offloaded to the host
            return {key: weights for key in first.segments}, 0
    shared_key = None
    # not with videos: then the difference moves with the image size for every family that has videos (Qwen2-VL,
    # Qwen2.5-VL), as tests/test_speed_shortcuts.py showed
    if SHORTCUTS and kind == "text" and setup.images and not setup.videos \
            and builder.text_layer_delta_shared(setup.model):
        shared_key = (simulation_key_without_images(setup), tuple(sorted(base.items())))
        shared = _TEXT_DELTAS.get(shared_key)
        if shared is not None and shared[0].keys() == first.segments.keys():
            return shared
    bigger_result = simulate(setup, bigger)
    other = bigger_result.segments
    delta = {}
    for key, (b_total, b_categories) in first.segments.items():
        o_total, o_categories = other[key]
        delta[key] = (o_total - b_total, {cat: o_categories.get(cat, 0) - b_categories.get(cat, 0)
                                          for cat in set(b_categories) | set(o_categories)})
    answer = delta, bigger_result.host_peak_bytes - first.host_peak_bytes
    if shared_key is not None:
        if len(_TEXT_DELTAS) >= _MEMO_SIZE:
            _TEXT_DELTAS.pop(next(iter(_TEXT_DELTAS)))
        _TEXT_DELTAS[shared_key] = answer
    return answer


IMAGE_FIELDS = ("images", "image_max_pixels", "image_min_pixels")


def simulation_key_without_images(setup: TrainSetup) -> tuple:
    """The simulation key with the images' sizes left out (their number kept)."""
    kept = tuple(item for item in simulation_key(setup) if item[0] not in IMAGE_FIELDS)
    return kept + (("images", len(setup.images)),)


_TEXT_DELTAS: dict[tuple, tuple[dict, int]] = {}


def _construction_delta(setup: TrainSetup, base: dict[str, int], bigger: dict[str, int]):
    """(bytes, {category: bytes}) that building the model at `bigger` layer counts allocates beyond building it at
    `base` (no step run), or None when it is not only weights. Memoized without the micro-batch."""
    key = (simulation_key(setup), tuple(sorted(base.items())), tuple(sorted(bigger.items())))
    key = tuple(item for item in key[0] if item[0] not in ("batch_size", "gradient_accumulation_steps")) + key[1:]
    if key in _CONSTRUCTIONS:
        return _CONSTRUCTIONS[key]
    built = []
    for counts in (base, bigger):
        e = _engine(setup)
        model = model_for(setup.model.family)(e, setup, counts)
        built.append((e.current, dict(e.by_category)))
        del model, e
    (b_total, b_categories), (o_total, o_categories) = built
    categories = {cat: o_categories.get(cat, 0) - b_categories.get(cat, 0)
                  for cat in set(b_categories) | set(o_categories)}
    categories = {cat: d for cat, d in categories.items() if d}
    answer = (o_total - b_total, categories) if all(c.startswith("weights/") for c in categories) else None
    if len(_CONSTRUCTIONS) >= _MEMO_SIZE:
        _CONSTRUCTIONS.pop(next(iter(_CONSTRUCTIONS)))
    _CONSTRUCTIONS[key] = answer
    return answer


_CONSTRUCTIONS: dict[tuple, tuple | None] = {}


def clear_memos() -> None:
    """Forget every memoized simulation, key and shared difference, and the memos built on them elsewhere
    (`register_memo`; tests switching SHORTCUTS or emptying the persistent cache)."""
    for memo in (_MEMO, _KEYS, _TEXT_DELTAS, _CONSTRUCTIONS, *_DERIVED_MEMOS):
        memo.clear()


_DERIVED_MEMOS: list[dict] = []


def register_memo(memo: dict) -> dict:
    """A memo of results derived from simulations (estimate.py's live peaks), cleared with them."""
    _DERIVED_MEMOS.append(memo)
    return memo


@contextmanager
def full_simulation():
    """Within the block, `simulate_extrapolated` takes none of the shortcuts (and shares no memo with outside it)."""
    global SHORTCUTS
    was = SHORTCUTS
    SHORTCUTS = False
    clear_memos()
    try:
        yield
    finally:
        SHORTCUTS = was
        clear_memos()


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


def simulate_log(setup: TrainSetup) -> tuple[list, int]:
    """The full-depth step's allocation log (as `sim.recording_allocations` records it for `simulate(setup)`) and its
    live-tensor peak (the largest phase peak of `simulate(setup)`), from an engine that keeps neither the per-phase
    and per-segment peaks nor their breakdowns (`sim.LogEngine`): what the caching-allocator replay reads."""
    builder = model_for(setup.model.family)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        e = _engine(setup, engine=LogEngine)
        _step(builder, setup, None, e)
        return e.allocation_log, e.live_peak
    finally:
        if gc_was_enabled:
            gc.enable()


def _engine(setup: TrainSetup, detail: bool = False, engine: type | None = None) -> Engine:
    # `Engine` looked up at call time: the symbolic prototype (symbolic.py) substitutes its own engine by this name
    e = (engine or Engine)(detail)
    e.gpu_name = setup.gpu.name
    e.reduce_grads = bool(setup.zero)
    e.input_grads = input_embeddings_hooked(setup)
    e.liger = liger.swaps(setup)
    return e


def _simulate(builder, setup: TrainSetup, counts, detail: bool) -> SimResult:
    e = _engine(setup, detail)
    _step(builder, setup, counts, e)
    peaks = {phase: e.phase_peaks[phase][0] for phase in PHASES if phase in e.phase_peaks}
    breakdown = {phase: {k: v for k, v in e.phase_peaks[phase][1].items() if v} for phase in peaks}
    result = SimResult(peaks, breakdown, host_peak_bytes=e.host_peak_bytes)
    result.blocks = e.phase_blocks
    result.segment_peaks = {k: v[0] for k, v in e.segment_peaks.items()}
    result.segments = {k: v for k, v in e.segment_peaks.items() if k.split("/")[0] in PHASES}
    result.segment_blocks = e.segment_blocks
    return result


def _step(builder, setup: TrainSetup, counts, e: Engine) -> None:
    """One training step on the engine: build the model, optimizer states, inputs, the micro-steps, the optimizer
    step. Its locals (the model, states, inputs) die as it returns, in that order, as the real step's do."""
    reference = None
    if setup.preference:
        # the model runs the pairwise collator's 2 x batch_size rows (DPO; KTO: batch_size target or KL rows per
        # forward); a full / freeze fine-tune's reference is a
        # frozen copy in the compute dtype (planner/memory/preference.py)
        forward_setup = replace(setup, batch_size=setup.rows_per_micro_batch)
        model = builder(e, forward_setup, counts)
        if setup.uses_reference_copy:
            e.param_kind = "reference"
            reference = builder(e, reference_setup(forward_setup), counts)
            e.param_kind = None
    else:
        model = builder(e, setup, counts)
    # DeepSpeed keeps its own partitioned states (zero.py); the simulation holds the single-GPU torch ones
    states = [] if setup.zero else _optimizer_states(e, setup, model)
    inputs = model.inputs(e)
    if setup.stage == "kto":  # KTODataCollatorWithPadding's KL rows and kto_tags
        preference.add_kto_inputs(e, setup, inputs)
    micro_steps = min(setup.gradient_accumulation_steps, 2)
    for _ in range(micro_steps):
        e.set_phase("forward")
        if setup.preference:
            loss = preference.preference_loss(e, setup, model, reference, inputs)
        else:
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


def reference_setup(setup: TrainSetup) -> TrainSetup:
    """The DPO reference copy of a full / freeze fine-tune as LLaMA-Factory loads it (`create_ref_model` ->
    `load_model(is_trainable=False)`): every parameter frozen in the compute dtype, no checkpointing (only trainable
    models are prepared for training), so no input hooks."""
    frozen = copy.copy(setup)  # nothing trains: a setup TrainSetup's validation refuses from users, made directly
    for name, value in dict(method="full", vision=Train.FROZEN, projector=Train.FROZEN, language=Train.FROZEN,
                            gradient_checkpointing=False, vision_gradient_checkpointing=None,
                            offload_checkpoints=False).items():
        object.__setattr__(frozen, name, value)
    return frozen


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


