"""Dry-run trace: the live-tensor peak of a real training step, on the CPU, with fake tensors (no GPU, no weights).

The transformers model of the setup is built under `FakeTensorMode`, prepared by `build.prepare_model` exactly as
training prepares it, fed a synthetic batch with the setup's vision tokens, and run through forward, loss, backward,
gradient clipping and the optimizer step twice (the second step is the steady state: optimizer states exist while
activations are alive). `MemoryTracker` counts every storage, rounded to CUDA's 512-byte blocks, and CUDA-side
choices are emulated (`emulate.py`: CUDA autocast op lists, the CUDA attention kernels' saved tensors and backward
workspaces, foreach/fused optimizer defaults).

A full trace of a 7B VLM costs minutes on 2 cores, so `trace` runs a few layers of each layer type and extrapolates:
each phase's peak (and its breakdown) is affine in the number of layers of each type, so traces at the base layer
counts and at one extra layer per type give the slopes. `tests/test_trace.py` checks extrapolation against full
traces of small models.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field, replace

import torch

from vlplan.planner.errors import VlplanError
from vlplan.planner.setup import TrainSetup

from . import build, checkpoint_offload, cuda_autocast, emulate, flash_emulate, liger_emulate
from .batch import synthetic_batch
from .memtrack import MemoryTracker, Snapshot, track_modules
from .step import StepHooks, run_steps, trainer_forward

PHASES = ("forward", "loss", "backward", "optimizer")


@dataclass
class StepTrace:
    """What one traced run saw: per-phase peaks with their breakdowns (bytes), and the peaks of each segment
    (phase/component) of which the phase peak is the largest."""

    phase_peaks: dict[str, Snapshot]
    layers: dict[str, int]
    seconds: float = 0.0
    segments: dict[str, Snapshot] = field(default_factory=dict)

    @property
    def peak(self) -> Snapshot:
        return max(self.phase_peaks.values(), key=lambda s: s.total_bytes)


@dataclass
class TraceResult:
    """The same fields as the estimator's `Estimate`, measured: live-tensor bytes per phase and category."""

    setup: TrainSetup
    allocated_peak_bytes: int
    peak_bytes: int
    peak_phase: str
    breakdown_bytes: dict[str, int]
    by_category: dict[str, int]
    by_module: dict[str, int]
    phase_allocated_bytes: dict[str, int]
    layers_traced: list[dict[str, int]] = field(default_factory=list)
    extrapolated: bool = False
    seconds: float = 0.0
    emulated: list[str] = field(default_factory=list)  # kernels that ran as CPU emulations (besides CUDA's own)
    host_offloaded_bytes: int = 0  # offloaded checkpointing: checkpointed inputs in host RAM at their peak, per GPU

    @classmethod
    def from_snapshots(cls, setup, phases: dict[str, Snapshot], layers_traced, extrapolated, seconds):
        from vlplan.planner.memory.estimate import estimate

        allocated = {phase: snap.total_bytes for phase, snap in phases.items()}
        peak_phase = max(allocated, key=allocated.get)
        snap = phases[peak_phase]
        breakdown = {k: v for k, v in snap.by_category.items() if v}
        # the device terms the tracer cannot see (CUDA context, cuBLAS workspaces, NCCL buffers, and the caching
        # allocator's reserve from the estimator's replay of the full-depth step): the estimator's own, so the
        # trace's device peak differs from the estimate's by the live tensors alone
        breakdown.update({k: v for k, v in estimate(setup).breakdown_bytes.items() if k.startswith("cuda/")})
        by_category: dict[str, int] = {}
        for key, value in snap.by_category.items():
            by_category[key.split("/")[0]] = by_category.get(key.split("/")[0], 0) + value
        return cls(setup, snap.total_bytes, sum(breakdown.values()), peak_phase, breakdown, by_category,
                   dict(snap.by_module), allocated, layers_traced, extrapolated, seconds,
                   liger_emulate.emulated_kernels(setup))

    def to_dict(self) -> dict:
        from vlplan.planner.memory.estimate import param_summary

        params, trainable = param_summary(self.setup)
        return {
            "model": self.setup.model.name, "settings": self.setup.describe(), "params": params,
            "trainable_params": trainable,
            "tokens": {"vision_tokens_per_sample": self.setup.vision_tokens_per_sample,
                       "vision_patches_per_sample": self.setup.vision_patches_per_sample,
                       "seq_len": self.setup.seq_len},
            "peak_bytes": self.peak_bytes, "allocated_peak_bytes": self.allocated_peak_bytes,
            "peak_phase": self.peak_phase, "phase_allocated_bytes": self.phase_allocated_bytes,
            "breakdown_bytes": self.breakdown_bytes, "by_category": self.by_category, "by_module": self.by_module,
            "gpu": {"name": self.setup.gpu.name, "memory_bytes": self.setup.gpu.memory_bytes},
            "fits": self.peak_bytes <= self.setup.gpu.memory_bytes,
            "layers_traced": self.layers_traced, "extrapolated": self.extrapolated, "seconds": self.seconds,
            "emulated": self.emulated, "host_offloaded_bytes": self.host_offloaded_bytes,
        }


# Layer types: the planner's family modules define them (planner/memory/families) ----------------------------

from vlplan.planner.memory.families import layer_counts, spec_with_layers  # noqa: E402


# One traced run ------------------------------------------------------------------------------------------------------


def _component(family: str, name: str) -> str:
    """vision / projector / language for a (peft-wrapped) transformers module or parameter name."""
    from vlplan.planner.modules import component_of

    name = name.removeprefix("base_model.model.")
    for marker in (".base_layer", ".lora_A", ".lora_B", ".lora_magnitude_vector"):
        name = name.split(marker)[0]
    try:
        return component_of(family, name)
    except Exception:  # the top-level model (embedding lookup, image-feature scatter) belongs to the language side
        return "language"


def _phase_hooks(model, tracker: MemoryTracker, family: str) -> list:
    """Switch the tracker to the 'loss' phase when the LM head starts (logits and the loss belong to it), and mark
    segments: which component's forward runs, and in backward when the gradient reaches the language model's output
    (loss backward done) and its input (language model done)."""
    from vlplan.planner.modules import HF_COMPONENT_PREFIXES, LANGUAGE

    handles = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if name.endswith("lm_head") and not name.endswith("lm_head.base_layer"):
            def pre(_module, _args):
                tracker.phase = "loss"
            handles.append(module.register_forward_pre_hook(pre))
    prefix = "base_model.model." if any(n.startswith("base_model.model.") for n in modules) else ""
    for path, component in HF_COMPONENT_PREFIXES[family]:
        module = modules.get(prefix + path)
        if module is None or path == "lm_head":
            continue

        def enter(_module, _args, component=component):
            if tracker.phase == "forward":
                tracker.subphase = component
        handles.append(module.register_forward_pre_hook(enter))
        if component == LANGUAGE:
            def mark_backward(_module, args, kwargs, output):
                hidden = getattr(output, "last_hidden_state", None)
                if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                    hidden.register_hook(lambda grad: _set_subphase(tracker, "language"))
                embeds = kwargs.get("inputs_embeds")
                if isinstance(embeds, torch.Tensor) and embeds.requires_grad:
                    embeds.register_hook(lambda grad: _set_subphase(tracker, "encoder"))
            handles.append(module.register_forward_hook(mark_backward, with_kwargs=True))
    return handles


def _set_subphase(tracker: MemoryTracker, name: str) -> None:
    if tracker.phase == "backward":
        tracker.subphase = name


def run_trace(setup: TrainSetup, counts: dict[str, int] | None = None, *, fake: bool = True,
              steps: int = 2, detail: bool = False) -> StepTrace:
    """Trace `steps` optimizer steps of the setup's model with `counts` layers per type (default: all)."""
    if setup.zero or setup.world_size > 1:
        raise VlplanError("trace runs one process: ZeRO and multi-GPU sharding are estimated analytically; drop "
                          "--zero/--num-gpus for trace")
    if setup.method == "qlora":
        raise VlplanError("trace cannot run bitsandbytes 4/8-bit layers on the CPU; QLoRA is estimated analytically")
    if setup.optimizer in ("adamw-8bit", "paged-adamw-8bit"):
        raise VlplanError("trace cannot run bitsandbytes 8-bit optimizers on the CPU; use --optimizer adamw")
    if setup.attn == "fa2" and not setup.neat_packing:
        raise VlplanError("trace emulates FlashAttention-2's varlen kernel (neat packing) but not its dense one; use "
                          "--attn sdpa (FlashAttention under sdpa saves the same tensors as FA2) or --neat-packing")
    counts = counts or layer_counts(setup.model)
    spec = spec_with_layers(setup.model, counts)
    start = time.perf_counter()
    mode = emulate.fake_mode() if fake else contextlib.nullcontext()
    with emulate.cuda_emulation(setup, fake=fake), cuda_autocast.cuda_autocast_policy(build.autocast_dtype(setup)), \
            liger_emulate.liger_kernels(setup, setup.model.family), checkpoint_offload.emulated_offload(setup), \
            flash_emulate.flash_attention_2(setup):
        with mode, (emulate.fake_module_conversions() if fake else contextlib.nullcontext()):
            model = build.create_model(setup, spec)
            model = build.prepare_model(model, replace(setup, model=spec))
            optimizer = build.make_optimizer(model, setup, emulate_cuda=True)
            reference = build.reference_model(setup, spec) if setup.uses_reference_copy else None
            if setup.preference:  # CustomDPOTrainer / CustomKTOTrainer.__init__: trl disable_dropout_in_model
                for module in model.modules():
                    if isinstance(module, torch.nn.Dropout):
                        module.p = 0.0
        # the pairwise collator's batch: chosen and rejected rows (setup.rows_per_micro_batch); KTO's collator adds
        # the KL rows and the tags (profiler/batch.py)
        batch = synthetic_batch(replace(setup, model=spec, batch_size=setup.rows_per_micro_batch), model,
                                mode if fake else None)
        tracker = MemoryTracker(detail=detail)
        tracker.scope_of = functools.partial(_component, setup.model.family)
        emulate.set_tracker(tracker)
        handles = track_modules(model, tracker) + _phase_hooks(model, tracker, setup.model.family)
        trainable = [p for p in model.parameters() if p.requires_grad]
        names = {id(p): n for n, p in model.named_parameters()}
        for param in trainable:
            category = f"gradients/{_component(setup.model.family, names[id(param)])}"
            handles.append(param.register_post_accumulate_grad_hook(
                lambda p, category=category: tracker.track(p.grad, category)))
        phase_peaks = _run_steps(setup, model, optimizer, batch, tracker, steps, mode, reference)
        segments = {k: v for k, v in tracker.segment_snapshots().items() if k.split("/")[0] in PHASES}
        for handle in handles:
            handle.remove()
    result = StepTrace(phase_peaks, counts, time.perf_counter() - start, segments)
    result.host_peak_bytes = checkpoint_offload.OffloadedCheckpoint.host_peak_bytes if setup.offload_checkpoints else 0
    return result


class _TrackerPhases(StepHooks):
    """The tracker follows the steps: the phase of each, the peak reset before the last step (the steady state:
    optimizer states exist from the first step on), the optimizer states tracked as they appear."""

    def __init__(self, tracker: MemoryTracker, steps: int) -> None:
        self.tracker, self.steps = tracker, steps

    def step_start(self, step: int) -> None:
        if step == self.steps:
            self.tracker.reset_peak()

    def phase(self, name: str, step: int) -> None:
        self.tracker.phase = name
        if name == "backward":
            self.tracker.subphase = "loss"

    def step_end(self, step: int, optimizer) -> None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    kind = "step_counters" if value.dim() == 0 else "adam_states"
                    self.tracker.track(value, f"optimizer/{kind}")
        self.tracker.phase = "idle"


def _run_steps(setup, model, optimizer, batch, tracker, steps, mode, reference=None) -> dict[str, Snapshot]:
    forward = trainer_forward(model, build.autocast_dtype(setup))
    if setup.preference:  # LLaMA-Factory's CustomDPOTrainer / CustomKTOTrainer step (profiler/preference.py)
        from .preference import preference_loss

        # accelerate's prepare_model wraps the reference copy's forward in the same autocast (evaluation_mode only
        # skips the DDP wrapper: accelerator.py `prepare_model`)
        ref_forward = trainer_forward(reference, build.autocast_dtype(setup)) if reference is not None else None
        forward = preference_loss(setup, model, forward, ref_forward)
    with mode, tracker:
        family = setup.model.family
        for name, param in model.named_parameters():
            kind = "adapters" if "lora_" in name else "weights"
            tracker.track(param, f"{kind}/{_component(family, name)}")
        for name, buf in model.named_buffers():
            tracker.track(buf, f"weights/{_component(family, name)}")
        if reference is not None:
            for name, tensor in [*reference.named_parameters(), *reference.named_buffers()]:
                tracker.track(tensor, f"reference/{_component(family, name)}")
        tracker.tag(batch.tensors.values(), "inputs/batch")
        run_steps(setup, model, optimizer, batch.tensors, forward, steps, _TrackerPhases(tracker, steps))
        tracker.snapshot_peak()
        return {phase: snap for phase, snap in tracker.phase_snapshots.items() if phase in PHASES}


# Extrapolated traces ---------------------------------------------------------------------------------------------------

BASE_LAYERS = {"text": 2, "vision": 2, "vision_window": 2, "vision_full": 1}


def _base_counts(setup: TrainSetup, full: dict[str, int], base: int | None) -> dict[str, int]:
    from vlplan.planner.memory.families import base_layer_counts

    counts = base_layer_counts(setup, full, base or 2)
    for kind, n in full.items():
        if base is None and kind in BASE_LAYERS:
            counts[kind] = max(counts[kind], min(n, BASE_LAYERS[kind]))
    return counts


def trace(setup: TrainSetup, *, layers: int | None = None, full: bool = False) -> "TraceResult":
    """Trace the setup's training step; unless `full`, run `layers` (default 2) layers of each type plus one more of
    each type, and extrapolate every phase's peak and breakdown linearly to the real layer counts."""
    if layers is not None and layers < 1:
        raise VlplanError(f"--layers must be 1 or more (0: automatic), got {layers}")
    start = time.perf_counter()
    real = layer_counts(setup.model)
    # DPO: the reference forward re-runs the layers inside the loss phase, so which visit of a segment peaks changes
    # with depth; traced at full depth, as the estimator simulates it (planner/memory/step.py)
    base = real if full or setup.preference else _base_counts(setup, real, layers)
    runs = [run_trace(setup, base)]
    slopes = {}
    for kind, n in real.items():
        if n > base[kind]:
            bigger = dict(base, **{kind: base[kind] + 1})
            slopes[kind] = (n - base[kind], run_trace(setup, bigger))
    segment_snaps = {}
    for phase, snap in runs[0].segments.items():
        total, categories, modules = snap.total_bytes, dict(snap.by_category), dict(snap.by_module)
        for kind, (extra, run) in slopes.items():
            other = run.segments[phase]
            total += extra * (other.total_bytes - snap.total_bytes)
            for key in set(categories) | set(other.by_category):
                categories[key] = categories.get(key, 0) + extra * (other.by_category.get(key, 0)
                                                                    - snap.by_category.get(key, 0))
            for key in set(modules) | set(other.by_module):
                modules[key] = modules.get(key, 0) + extra * (other.by_module.get(key, 0) - snap.by_module.get(key, 0))
        segment_snaps[phase] = Snapshot(total, phase, {k: v for k, v in categories.items() if v},
                                        {k: v for k, v in modules.items() if v})
    # each segment's peak is affine in the layer counts; a phase's peak is the largest of its segments
    phase_snaps = {}
    for key, snap in segment_snaps.items():
        phase = key.split("/")[0]
        if phase not in phase_snaps or snap.total_bytes > phase_snaps[phase].total_bytes:
            phase_snaps[phase] = Snapshot(snap.total_bytes, phase, snap.by_category, snap.by_module)
    layers_traced = [runs[0].layers] + [run.layers for _, run in slopes.values()]
    result = TraceResult.from_snapshots(setup, phase_snaps, layers_traced, bool(slopes), time.perf_counter() - start)
    # the host copies are one per checkpointed layer: affine in the layer counts too
    result.host_offloaded_bytes = runs[0].host_peak_bytes + sum(
        extra * (run.host_peak_bytes - runs[0].host_peak_bytes) for extra, run in slopes.values())
    return result
