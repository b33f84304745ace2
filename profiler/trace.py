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
import time
from dataclasses import dataclass, field, replace

import torch

from vlplan.planner.errors import VlplanError
from vlplan.planner.setup import TrainSetup

from . import build, cuda_autocast, emulate
from .batch import synthetic_batch
from .memtrack import MemoryTracker, Snapshot, track_modules

PHASES = ("forward", "loss", "backward", "optimizer")


@dataclass
class StepTrace:
    """What one traced run saw: per-phase peaks with their breakdowns (bytes)."""

    phase_peaks: dict[str, Snapshot]
    layers: dict[str, int]
    seconds: float = 0.0

    @property
    def peak(self) -> Snapshot:
        return max(self.phase_peaks.values(), key=lambda s: s.total_bytes)


@dataclass
class TraceResult:
    allocated_peak_bytes: int
    peak_phase: str
    by_category: dict[str, int]
    by_module: dict[str, int]
    phase_peaks_bytes: dict[str, int]
    layers_traced: list[dict[str, int]] = field(default_factory=list)
    extrapolated: bool = False
    seconds: float = 0.0


# Layer types: the planner's family modules define them (planner/memory/families) ----------------------------

from vlplan.planner.memory.families import layer_counts, spec_with_layers  # noqa: E402


# One traced run ------------------------------------------------------------------------------------------------------


def _phase_hooks(model, tracker: MemoryTracker) -> list:
    """Switch the tracker to the 'loss' phase when the LM head starts: logits and the loss belong to it."""
    handles = []
    for name, module in model.named_modules():
        if name.endswith("lm_head") and not name.endswith("lm_head.base_layer"):
            def pre(_module, _args):
                tracker.phase = "loss"
            handles.append(module.register_forward_pre_hook(pre))
    return handles


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
    if setup.attn == "fa2":
        raise VlplanError("trace emulates the CUDA kernels of sdpa and eager attention; use --attn sdpa (FlashAttention"
                          " under sdpa saves the same tensors as FA2)")
    counts = counts or layer_counts(setup.model)
    spec = spec_with_layers(setup.model, counts)
    start = time.perf_counter()
    mode = emulate.fake_mode() if fake else contextlib.nullcontext()
    with emulate.cuda_emulation(setup, fake=fake), cuda_autocast.cuda_autocast_policy(build.autocast_dtype(setup)):
        with mode, (emulate.fake_module_conversions() if fake else contextlib.nullcontext()):
            model = build.create_model(setup, spec)
            model = build.prepare_model(model, replace(setup, model=spec))
            optimizer = build.make_optimizer(model, setup, emulate_cuda=True)
        batch = synthetic_batch(replace(setup, model=spec), model, mode if fake else None)
        tracker = MemoryTracker(detail=detail)
        emulate.set_tracker(tracker)
        handles = track_modules(model, tracker) + _phase_hooks(model, tracker)
        trainable = [p for p in model.parameters() if p.requires_grad]
        for param in trainable:
            handles.append(param.register_post_accumulate_grad_hook(
                lambda p: tracker.track(p.grad, "gradients")))
        phase_peaks = _run_steps(setup, model, optimizer, batch, tracker, trainable, steps, mode)
        for handle in handles:
            handle.remove()
    return StepTrace(phase_peaks, counts, time.perf_counter() - start)


def _trainer_forward(model, autocast: torch.dtype | None):
    """The forward the HF Trainer runs: accelerate wraps `model.forward` in autocast and then converts the outputs'
    half-precision tensors to fp32 (accelerate.utils.convert_outputs_to_fp32; an fp32 copy of the logits)."""
    if autocast is None:
        return model

    def autocast_forward(**inputs):
        with cuda_autocast.autocast(autocast):
            return model(**inputs)

    from accelerate.utils import convert_outputs_to_fp32

    return convert_outputs_to_fp32(autocast_forward)


def _run_steps(setup, model, optimizer, batch, tracker, trainable, steps, mode) -> dict[str, Snapshot]:
    autocast = build.autocast_dtype(setup)
    forward = _trainer_forward(model, autocast)
    micro_steps = min(setup.gradient_accumulation_steps, 2)
    with mode, tracker:
        tracker.tag(model.parameters(), "parameters")
        tracker.tag(model.buffers(), "parameters")
        tracker.tag(batch.tensors.values(), "inputs")
        for step in range(steps):
            if step == steps - 1:
                tracker.reset_peak()  # report the steady state: optimizer states exist from the first step on
            for _ in range(micro_steps):
                tracker.phase = "forward"
                loss = forward(**batch.tensors)["loss"]
                tracker.phase = "backward"
                loss.backward()
                del loss
            tracker.phase = "optimizer"
            torch.nn.utils.clip_grad_norm_(trainable, setup.max_grad_norm, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for state in optimizer.state.values():
                tracker.tag([v for v in state.values() if isinstance(v, torch.Tensor)], "optimizer_states")
            tracker.phase = "idle"
        tracker.snapshot_peak()
        return {phase: snap for phase, snap in tracker.phase_snapshots.items() if phase in PHASES}
