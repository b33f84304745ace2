"""The cpu backend of `profile`: a test/dev backend that runs the profile's real steps on CPU tensors.

It exists so the whole profile pipeline (build, prepare, steps, per-phase records, JSON, comparison, plot, the
out-of-memory path, sweeps in subprocesses) runs and is tested on machines without a GPU. It measures what the
tracer measures, on real tensors: live storage bytes in the CUDA allocator's 512-byte blocks (`MemoryTracker`), with
CUDA's autocast lists and fused-attention allocations emulated as in `vlplan trace`, so its phase peaks are
comparable with the estimate's live-tensor peaks. It has no caching allocator, no device and no CUDA context: the
reserved and device-used peaks are None, and step times are CPU times.

`memory_limit_bytes` is a simulated device capacity: when live tensors exceed it, the tracker raises
`torch.OutOfMemoryError` from the op that crossed it, as the CUDA allocator would, so the out-of-memory handling of
`profile` and `profile --sweep` runs for real on any machine.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform

import torch

from vlplan.planner.setup import TrainSetup
from vlplan.planner.units import GIB

from . import build, cuda_autocast, emulate
from .memtrack import MemoryTracker, track_modules
from .profile import Backend, PhaseRecord, ProfileOptions


class LimitedTracker(MemoryTracker):
    """A MemoryTracker that samples the live bytes after every op (the timeline) and raises torch.OutOfMemoryError
    once they exceed `limit_bytes`."""

    def __init__(self, limit_bytes: int | None, clock) -> None:
        super().__init__()
        self.limit_bytes = limit_bytes
        self.clock = clock
        self.samples: list[tuple[float, int]] = []
        self.exceeded: dict | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.current_bytes
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.paused:
            return out
        self.samples.append((self.clock(), self.current_bytes))
        if self.limit_bytes is not None and self.current_bytes > self.limit_bytes:
            requested = max(self.current_bytes - before, 0)
            self.exceeded = {"live_bytes": self.current_bytes, "requested_bytes": requested}
            raise torch.OutOfMemoryError(
                f"out of memory on the cpu backend: Tried to allocate {requested / 2**20:.2f} MiB with "
                f"{before / GIB:.4f} GiB live; --memory-limit-gib is {self.limit_bytes / GIB:.4f} GiB "
                f"({func.__name__})")
        return out


class CpuBackend(Backend):
    name = "cpu"
    device = torch.device("cpu")

    def __init__(self, options: ProfileOptions) -> None:
        super().__init__(options)
        self.tracker = LimitedTracker(options.memory_limit_bytes, self.now)
        self._start_bytes = 0

    @contextlib.contextmanager
    def session(self, setup: TrainSetup):
        dtype = build.autocast_dtype(setup)
        with emulate.cuda_emulation(setup, fake=False), cuda_autocast.cuda_autocast_policy(dtype):
            emulate.set_tracker(self.tracker)  # the attention emulation registers its outputs with it
            with self.tracker:
                yield

    # Phases
    def _open(self, phase: str) -> None:
        self.tracker.reset_peak()
        self.tracker.phase = phase
        self._start_bytes = self.tracker.current_bytes

    def _close(self, phase: str, step: int, start: float, end: float) -> PhaseRecord:
        self.tracker.snapshot_peak()
        snap = self.tracker.phase_snapshots.get(phase)
        peak = max(self._start_bytes, self.tracker.current_bytes, snap.total_bytes if snap else 0)
        breakdown = dict(snap.by_category) if snap and snap.total_bytes == peak else self.tracker.live_by_category()
        return PhaseRecord(phase, step, start, end, peak, breakdown_bytes=breakdown)

    def autocast(self, dtype: torch.dtype):
        return cuda_autocast.autocast(dtype)

    def creation(self):
        return contextlib.nullcontext()

    def watch(self, model, setup: TrainSetup, batch: dict) -> list:
        """Name the live storages with the estimate's terms (weights/<component>, adapters/..., inputs/batch,
        activations/<component>, gradients/<component>, optimizer/...) so the peak's breakdown reads like the
        estimate's."""
        from .profile import component_of

        tracker = self.tracker
        tracker.scope_of = functools.partial(component_of, setup)
        for name, param in model.named_parameters():
            kind = "adapters" if "lora_" in name else "weights"
            tracker.track(param, f"{kind}/{component_of(setup, name)}")
        for name, buf in model.named_buffers():
            tracker.track(buf, f"weights/{component_of(setup, name)}")
        tracker.tag(batch.values(), "inputs/batch")
        handles = track_modules(model, tracker)
        for name, param in model.named_parameters():
            if param.requires_grad:
                category = f"gradients/{component_of(setup, name)}"
                handles.append(param.register_post_accumulate_grad_hook(
                    lambda p, category=category: tracker.track(p.grad, category)))
        return handles

    def after_optimizer_step(self, optimizer) -> None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    self.tracker.track(value, "optimizer/step_counters" if value.dim() == 0 else
                                       "optimizer/adam_states")

    def allocated_bytes(self) -> int:
        return self.tracker.current_bytes

    def device_info(self) -> dict:
        return {"name": "cpu", "backend": "cpu", "description": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(), "total_memory_bytes": None,
                "memory_limit_bytes": self.options.memory_limit_bytes}

    def timeline(self) -> list[tuple]:
        return [(t, live, None, None) for t, live in self.tracker.samples]

    def oom_detail(self) -> dict:
        return {"memory_limit_bytes": self.options.memory_limit_bytes, **(self.tracker.exceeded or {})}
