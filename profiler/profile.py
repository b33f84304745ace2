"""`profile(setup)`: real training steps, measured per phase (model load, forward, loss, backward, optimizer step).

The model is built from the spec with random weights (or loaded from `weights` as `vlplan run` loads it), prepared by
`build.prepare_model` and `build.make_optimizer` (the code the runner trains with) and fed `batch.synthetic_batch`
(the processor's tensors for the setup's images). Each step runs as the HF Trainer runs it: the forward under
autocast with accelerate's fp32 outputs, `loss.backward()` per micro-batch (at most two, as the tracer), gradient
clipping, `optimizer.step()`, `zero_grad(set_to_none=True)`.

A backend measures the phases: `gpu.CudaBackend` (torch.cuda peaks, NVML device memory, the CUDA context and cuBLAS
workspaces) or `cpu.CpuBackend`, a test/dev backend that runs the same steps on CPU tensors and counts live storage
with the tracer's `MemoryTracker` (with CUDA's allocations emulated as `vlplan trace` does), so the whole pipeline
(build, prepare, steps, per-phase records, JSON, comparison, plot, out-of-memory handling) runs in CPU tests.

The first step has no optimizer states yet, so the reported phase peaks are the steady state: the maximum over steps
2..N (over the only step with `steps=1`).
"""

from __future__ import annotations

import contextlib
import gc
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlplan.planner.errors import VlplanError
from vlplan.planner.memory.estimate import Estimate, estimate
from vlplan.planner.setup import TrainSetup
from vlplan.planner.units import GIB

from . import build
from .batch import synthetic_batch
from .memtrack import rounded_bytes
from .step import StepHooks, run_steps, trainer_forward

LOAD = "load"
TRAINING_PHASES = ("forward", "loss", "backward", "optimizer")
PHASES = (LOAD,) + TRAINING_PHASES
BACKENDS = ("cuda", "cpu")
# Terms measured by enumerating tensors (identical in every phase after the first optimizer step)
PERSISTENT_TERMS = ("weights/", "adapters/", "optimizer/", "inputs/")
STEP_TERM = "step tensors (activations, temporaries, gradients)"
TIMELINE_POINTS = 2000


@dataclass(frozen=True)
class ProfileOptions:
    """How to profile, besides the TrainSetup."""

    steps: int = 3
    backend: str = "cuda"
    weights: str | None = None  # a model directory to load real weights from (default: random weights)
    memory_limit_bytes: int | None = None  # cap the device memory (cuda: allocator fraction; cpu: live tensors)
    snapshot: str | None = None  # torch.cuda memory snapshot pickle (cuda only)
    sample_interval_s: float = 0.005  # cuda: the memory sampler's period (timeline, NVML peak)

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= 100:
            raise VlplanError(f"--steps must be between 1 and 100, got {self.steps}")
        if self.backend not in BACKENDS:
            raise VlplanError(f"--backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.memory_limit_bytes is not None and self.memory_limit_bytes <= 0:
            raise VlplanError(f"--memory-limit-gib must be positive, got {self.memory_limit_bytes / GIB:g}")
        if self.snapshot and self.backend != "cuda":
            raise VlplanError("--snapshot records torch.cuda's allocator history; it needs --backend cuda")
        if self.weights is not None and not (Path(self.weights).expanduser() / "config.json").is_file():
            raise VlplanError(f"--weights {self.weights}: no config.json there; pass a model directory "
                              "(from_pretrained layout)")
        if self.sample_interval_s <= 0:
            raise VlplanError(f"sample interval must be positive, got {self.sample_interval_s}")

    def to_dict(self) -> dict:
        return {"steps": self.steps, "backend": self.backend, "weights": self.weights,
                "memory_limit_bytes": self.memory_limit_bytes, "snapshot": self.snapshot}


# Backends -----------------------------------------------------------------------------------------------------------
@dataclass
class PhaseRecord:
    """One phase of one step as a backend measured it. Bytes are peaks within the phase (allocated: live tensors in
    512-byte blocks; reserved: the caching allocator's segments; device_used: NVML's used memory less what was in use
    before the profile started); None where the backend has no such quantity."""

    phase: str
    step: int
    start_s: float
    end_s: float
    allocated_peak_bytes: int
    reserved_peak_bytes: int | None = None
    device_used_peak_bytes: int | None = None
    breakdown_bytes: dict[str, int] | None = None  # live bytes per category at the phase peak (cpu backend)

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s

    def to_dict(self) -> dict:
        return {"phase": self.phase, "step": self.step, "start_s": round(self.start_s, 6),
                "end_s": round(self.end_s, 6), "seconds": round(self.seconds, 6),
                "allocated_peak_bytes": self.allocated_peak_bytes, "reserved_peak_bytes": self.reserved_peak_bytes,
                "device_used_peak_bytes": self.device_used_peak_bytes}


class Backend:
    """Where the steps run and how their memory is read. Subclasses implement the `_`-prefixed hooks.

    `begin(phase)` closes the running phase (its peaks become a PhaseRecord), resets the peaks and opens the next;
    phases are timed between device synchronizations.
    """

    name = "base"
    device = torch.device("cpu")

    def __init__(self, options: ProfileOptions) -> None:
        self.options = options
        self.records: list[PhaseRecord] = []
        self.phase: str | None = None
        self.step = 0
        self._start = 0.0
        self._t0 = time.perf_counter()
        self.warnings: list[str] = []

    # Lifetime: `with backend.session(setup):` around everything that allocates
    def session(self, setup: TrainSetup):
        raise NotImplementedError

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def begin(self, phase: str, step: int | None = None) -> None:
        self.sync()
        now = self.now()
        if self.phase is not None:
            self.records.append(self._close(self.phase, self.step, self._start, now))
        self.phase, self.step, self._start = phase, self.step if step is None else step, now
        self._open(phase)

    def end(self) -> None:
        """Close the running phase."""
        if self.phase is None:
            return
        self.sync()
        now = self.now()
        self.records.append(self._close(self.phase, self.step, self._start, now))
        self.phase = None
        self._open("idle")

    # Hooks
    def sync(self) -> None:
        pass

    def _open(self, phase: str) -> None:
        raise NotImplementedError

    def _close(self, phase: str, step: int, start: float, end: float) -> PhaseRecord:
        raise NotImplementedError

    def autocast(self, dtype: torch.dtype):
        raise NotImplementedError

    def creation(self):
        """The context the model is created in (its parameters land on the device)."""
        raise NotImplementedError

    def watch(self, model, setup: TrainSetup, batch: dict) -> list:
        """Called once the model, optimizer and batch exist; returns hook handles to remove at the end."""
        return []

    def after_optimizer_step(self, optimizer) -> None:
        pass

    def allocated_bytes(self) -> int:
        raise NotImplementedError

    def release(self) -> None:
        """Give cached memory back after the tensors are gone (an out-of-memory error, the end)."""

    def device_info(self) -> dict:
        raise NotImplementedError

    def overheads(self) -> dict:
        """Measured device memory outside live tensors (bytes, None where not measurable)."""
        return {"context_init_bytes": None, "non_allocator_bytes": None, "cublas_workspace_bytes": 0,
                "baseline_used_bytes": None}

    def timeline(self) -> list[tuple]:
        """(t_s, allocated, reserved or None, device_used or None) samples, in time order."""
        return []

    def on_oom(self) -> None:
        """Called inside the out-of-memory handler, before anything is freed."""

    def oom_detail(self) -> dict:
        return {}


def make_backend(options: ProfileOptions) -> Backend:
    if options.backend == "cuda":
        from .gpu import CudaBackend

        return CudaBackend(options)
    from .cpu import CpuBackend

    return CpuBackend(options)


# Results ------------------------------------------------------------------------------------------------------------
@dataclass
class PhaseSummary:
    """A phase over the steady-state steps: the largest peaks and the mean time."""

    phase: str
    allocated_peak_bytes: int
    reserved_peak_bytes: int | None
    device_used_peak_bytes: int | None
    seconds: float
    breakdown_bytes: dict[str, int] | None = None

    def to_dict(self) -> dict:
        return {"allocated_peak_bytes": self.allocated_peak_bytes, "reserved_peak_bytes": self.reserved_peak_bytes,
                "device_used_peak_bytes": self.device_used_peak_bytes, "seconds": round(self.seconds, 6),
                "breakdown_bytes": self.breakdown_bytes}


@dataclass
class ProfileResult:
    setup: TrainSetup
    options: ProfileOptions
    estimate: Estimate
    device: dict
    versions: dict
    records: list[PhaseRecord]
    phases: dict[str, PhaseSummary]
    terms_bytes: dict[str, int]  # persistent tensors by estimate term name (enumerated) and the gradients
    overheads: dict
    step_times_s: list[float]
    timeline: list[tuple] = field(default_factory=list)
    oom: dict | None = None
    host_rss_peak_bytes: int | None = None
    warnings: list[str] = field(default_factory=list)
    date: str = ""

    # Headline numbers
    @property
    def training_phases(self) -> dict[str, PhaseSummary]:
        return {p: s for p, s in self.phases.items() if p in TRAINING_PHASES}

    @property
    def peak_phase(self) -> str | None:
        phases = self.training_phases
        return max(phases, key=lambda p: phases[p].allocated_peak_bytes) if phases else None

    @property
    def allocated_peak_bytes(self) -> int | None:
        """torch.cuda.max_memory_allocated over the steady-state step (cpu: the tracker's live-tensor peak)."""
        phases = self.training_phases
        return max(s.allocated_peak_bytes for s in phases.values()) if phases else None

    @property
    def reserved_peak_bytes(self) -> int | None:
        values = [s.reserved_peak_bytes for s in self.training_phases.values() if s.reserved_peak_bytes is not None]
        return max(values) if values else None

    @property
    def device_peak_bytes(self) -> int | None:
        """NVML used memory at its highest over the whole run, less what was used before: what nvidia-smi shows for
        this process, comparable with the estimate's `peak_bytes`."""
        values = [r.device_used_peak_bytes for r in self.records if r.device_used_peak_bytes is not None]
        return max(values) if values else None

    @property
    def step_time_s(self) -> float | None:
        """Median time of the steps after the first (the first loads kernels and creates optimizer states)."""
        times = self.step_times_s[1:] or self.step_times_s
        return statistics.median(times) if times else None

    # Comparisons with the estimate
    def phase_rows(self) -> list[dict]:
        """Per phase: measured peaks against the estimate's live-tensor peak of that phase. The allocated peak is
        compared after taking the measured cuBLAS workspaces out (the caching allocator holds them; the estimate
        counts them as the separate term cuda/cublas_workspace)."""
        workspace = self.overheads.get("cublas_workspace_bytes") or 0
        rows = []
        for phase in PHASES:
            summary = self.phases.get(phase)
            if summary is None:
                continue
            estimated = self.estimate.phase_allocated_bytes.get(phase)
            measured = summary.allocated_peak_bytes - workspace
            rows.append({"phase": phase, "measured_allocated_bytes": summary.allocated_peak_bytes,
                         "measured_live_bytes": measured, "estimate_allocated_bytes": estimated,
                         "error": relative_error(estimated, measured),
                         "reserved_peak_bytes": summary.reserved_peak_bytes,
                         "device_used_peak_bytes": summary.device_used_peak_bytes, "seconds": summary.seconds})
        return rows

    def term_rows(self) -> list[dict]:
        """Per estimate term: persistent tensors (weights, adapters, optimizer states, inputs) measured by adding up
        their storages; the rest of the live-tensor peak as one step term; the CUDA terms measured by the backend.
        Empty after an out-of-memory error (the steps did not complete)."""
        if self.oom is not None:
            return []
        e = self.estimate
        rows = []
        names = sorted({k for k in list(e.breakdown_bytes) + list(self.terms_bytes) if k.startswith(PERSISTENT_TERMS)})
        for name in names:
            estimated, measured = e.breakdown_bytes.get(name, 0), self.terms_bytes.get(name, 0)
            rows.append({"term": name, "estimate_bytes": estimated, "measured_bytes": measured,
                         "error": relative_error(estimated, measured)})
        peak = self.allocated_peak_bytes
        if peak is not None:
            workspace = self.overheads.get("cublas_workspace_bytes") or 0
            persistent = sum(v for k, v in self.terms_bytes.items() if k.startswith(PERSISTENT_TERMS))
            estimated = e.allocated_peak_bytes - sum(v for k, v in e.breakdown_bytes.items()
                                                     if k.startswith(PERSISTENT_TERMS))
            measured = peak - workspace - persistent
            rows.append({"term": STEP_TERM, "estimate_bytes": estimated, "measured_bytes": measured,
                         "error": relative_error(estimated, measured)})
        for name, measured in self.cuda_terms().items():
            estimated = e.breakdown_bytes.get(name, 0)
            rows.append({"term": name, "estimate_bytes": estimated, "measured_bytes": measured,
                         "error": relative_error(estimated, measured)})
        return rows

    def cuda_terms(self) -> dict[str, int]:
        """The estimate's cuda/* terms as measured: the context (everything NVML sees beyond the caching allocator:
        context, lazily loaded kernels, library handles), the cuBLAS workspaces, the allocator's reserve at the peak
        (reserved - allocated in the peak phase). Only what this backend measured."""
        terms = {}
        if self.overheads.get("non_allocator_bytes") is not None:
            terms["cuda/context"] = self.overheads["non_allocator_bytes"]
        if self.options.backend == "cuda":
            terms["cuda/cublas_workspace"] = self.overheads.get("cublas_workspace_bytes") or 0
        phase = self.peak_phase
        if phase is not None and self.phases[phase].reserved_peak_bytes is not None:
            terms["cuda/allocator_reserve"] = (self.phases[phase].reserved_peak_bytes
                                               - self.phases[phase].allocated_peak_bytes)
        return terms

    def to_dict(self) -> dict:
        e = self.estimate
        return {
            "model": self.setup.model.name, "settings": self.setup.describe(), "profile": self.options.to_dict(),
            "date": self.date, "device": self.device, "versions": self.versions,
            "measured": {
                "allocated_peak_bytes": self.allocated_peak_bytes, "reserved_peak_bytes": self.reserved_peak_bytes,
                "device_peak_bytes": self.device_peak_bytes, "peak_phase": self.peak_phase,
                "phases": {p: s.to_dict() for p, s in self.phases.items()}, "terms_bytes": self.terms_bytes,
                "overheads": self.overheads, "step_times_s": [round(t, 6) for t in self.step_times_s],
                "step_time_s": self.step_time_s, "host_rss_peak_bytes": self.host_rss_peak_bytes,
            },
            "estimate": {"peak_bytes": e.peak_bytes, "allocated_peak_bytes": e.allocated_peak_bytes,
                         "peak_phase": e.peak_phase, "phase_allocated_bytes": e.phase_allocated_bytes,
                         "breakdown_bytes": e.breakdown_bytes},
            "comparison": {"phases": self.phase_rows(), "terms": self.term_rows()},
            "records": [r.to_dict() for r in self.records],
            "timeline": [list(point) for point in self.timeline],
            "oom": self.oom, "warnings": self.warnings,
        }

    def to_record(self) -> dict:
        """The sweep's record (benchmarks/results/*.json): the issue's fields plus what calibration reads."""
        e = self.estimate
        return {
            "config": self.setup.describe(), "device": self.device.get("name"), "backend": self.options.backend,
            "torch": self.versions.get("torch"), "transformers": self.versions.get("transformers"),
            "versions": self.versions, "date": self.date,
            "estimate_peak_bytes": e.peak_bytes, "measured_peak_bytes": self.device_peak_bytes,
            "estimate_allocated_peak_bytes": e.allocated_peak_bytes,
            "measured_allocated_peak_bytes": self.allocated_peak_bytes,
            "measured_reserved_peak_bytes": self.reserved_peak_bytes,
            "oom": self.oom is not None, "oom_report": self.oom, "error": None, "step_time_s": self.step_time_s,
            "estimate_peak_phase": e.peak_phase, "measured_peak_phase": self.peak_phase,
            "estimate_breakdown_bytes": e.breakdown_bytes, "estimate_phase_allocated_bytes": e.phase_allocated_bytes,
            "measured_phases": {p: s.to_dict() for p, s in self.phases.items()},
            "measured_terms_bytes": self.terms_bytes, "overheads": self.overheads,
            "host_rss_peak_bytes": self.host_rss_peak_bytes, "steps": self.options.steps,
            "capacity_bytes": self.options.memory_limit_bytes or self.device.get("total_memory_bytes"),
        }


def relative_error(estimated: int | None, measured: int | None) -> float | None:
    """(estimate - measured) / measured: negative when the estimate is too low (an under-prediction)."""
    if estimated is None or measured is None or measured == 0:
        return None
    return (estimated - measured) / measured


def versions() -> dict:
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "transformers": transformers.__version__, "cuda": torch.version.cuda}
    try:
        import peft

        found["peft"] = peft.__version__
    except ImportError:
        found["peft"] = None
    return found


# The profile --------------------------------------------------------------------------------------------------------
def check_profilable(setup: TrainSetup, options: ProfileOptions) -> None:
    if setup.zero or setup.world_size > 1:
        raise VlplanError("profile runs one training process on one device; ZeRO and multi-GPU peaks are measured "
                          "by `vlplan run` (its vlplan_run.json); drop --zero/--num-gpus/--num-nodes for profile")
    if options.backend == "cpu":
        if setup.method == "qlora":
            raise VlplanError("the cpu backend cannot run bitsandbytes 4/8-bit layers; profile QLoRA with --backend "
                              "cuda")
        if setup.optimizer in ("adamw-8bit", "paged-adamw-8bit"):
            raise VlplanError("the cpu backend cannot run bitsandbytes 8-bit optimizers; use --optimizer adamw or "
                              "--backend cuda")
        if setup.attn == "fa2":
            raise VlplanError("the cpu backend emulates CUDA's sdpa and eager attention, not FlashAttention-2; use "
                              "--attn sdpa or --backend cuda")


def profile(setup: TrainSetup, options: ProfileOptions = ProfileOptions(), *, backend: Backend | None = None,
            on_event=lambda kind, data: None) -> ProfileResult:
    """Profile `options.steps` training steps of the setup (see module docstring). An out-of-memory error ends the
    steps: the result's `oom` says where (phase, step), what the estimate said and what the runner would try next,
    and the memory is freed before returning."""
    check_profilable(setup, options)
    expected = estimate(setup)
    backend = backend or make_backend(options)
    run = _Run(setup, options, backend)
    oom = None
    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with backend.session(setup):
        try:
            run.load(on_event)
            run.steps(on_event)
        except torch.OutOfMemoryError as err:
            backend.on_oom()
            oom = _oom_report(setup, expected, backend, err, run.start_bytes)
        finally:
            backend.end()
            run.remove_hooks()
        terms = dict(run.terms)
        run.free()
        gc.collect()
        backend.release()
        if oom is not None:
            oom["allocated_after_free_bytes"] = backend.allocated_bytes()
            on_event("oom", oom)
        overheads = backend.overheads()
    records = list(backend.records)
    return ProfileResult(setup, options, expected, backend.device_info(), versions(), records,
                         summarize(records, options.steps), terms, overheads, run.step_times,
                         downsample(backend.timeline(), TIMELINE_POINTS), oom, _host_rss_peak_bytes(),
                         backend.warnings + run.warnings, date)


def _oom_report(setup, expected, backend: Backend, err: BaseException, start_bytes: int | None) -> dict:
    """The runner's out-of-memory report (planner/oom.py): the phase, the estimate, the term most likely too low
    (judged from the memory measured before the first step, as `vlplan run` does) and the next setup to try."""
    from vlplan.planner.oom import oom_report

    report = oom_report(setup, expected, backend.phase or "load", err, start_bytes)
    report["step"] = backend.step
    report["message"] = report["message"].replace("CUDA out of memory", f"out of memory ({backend.name})", 1)
    report.update(backend.oom_detail())
    return report


class _Run:
    """The objects of one profile (model, optimizer, batch), so they can be dropped together on an OOM."""

    def __init__(self, setup: TrainSetup, options: ProfileOptions, backend: Backend) -> None:
        self.setup, self.options, self.backend = setup, options, backend
        self.model = self.optimizer = self.batch = self.forward = None
        self.handles: list = []
        self.terms: dict[str, int] = {}
        self.step_times: list[float] = []
        self.warnings: list[str] = []
        self.start_bytes: int | None = None  # allocated once everything is loaded, before the first step

    def load(self, on_event) -> None:
        setup, backend = self.setup, self.backend
        on_event("phase", {"phase": LOAD})
        with contextlib.ExitStack() as stack:
            weights = self.options.weights
            if weights is None and setup.method == "qlora":
                weights = stack.enter_context(random_checkpoint(setup, backend))
            backend.begin(LOAD, 0)
            model = load_model(setup, weights, backend)
        self.model = model = build.prepare_model(model, setup)
        self.optimizer = build.make_optimizer(model, setup, emulate_cuda=backend.name == "cpu")
        with torch.no_grad():
            self.batch = {k: v.to(backend.device) for k, v in synthetic_batch(setup, model).tensors.items()}
        self.forward = trainer_forward(model, build.autocast_dtype(setup), backend.autocast)
        self.handles = backend.watch(model, setup, self.batch) + self._loss_phase_hooks(model)
        self.terms.update(model_terms(model, setup))
        self.terms["inputs/batch"] = storage_bytes(self.batch.values())
        self.start_bytes = backend.allocated_bytes()

    def _loss_phase_hooks(self, model) -> list:
        """The loss phase starts when the LM head runs (the logits and the loss belong to it), as in the tracer."""
        backend = self.backend

        def pre(_module, _args):
            if backend.phase == "forward":
                backend.begin("loss")

        return [module.register_forward_pre_hook(pre) for name, module in model.named_modules()
                if name.endswith("lm_head") and not name.endswith("lm_head.base_layer")]

    def steps(self, on_event) -> None:
        run_steps(self.setup, self.model, self.optimizer, self.batch, self.forward, self.options.steps,
                  _BackendPhases(self, on_event))
        self.terms.update(optimizer_terms(self.optimizer))

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def free(self) -> None:
        if self.optimizer is not None:
            self.optimizer.state.clear()
        self.model = self.optimizer = self.batch = self.forward = None


class _BackendPhases(StepHooks):
    """The backend records each phase of each step (`begin` closes the running one) and the steps are timed between
    device synchronizations; the gradients are measured before the last optimizer step frees them."""

    def __init__(self, run: _Run, on_event) -> None:
        self.run, self.on_event = run, on_event
        self.start = 0.0

    def step_start(self, step: int) -> None:
        self.run.backend.sync()
        self.start = time.perf_counter()

    def phase(self, name: str, step: int) -> None:
        if name == "optimizer" and step == self.run.options.steps:
            self.run.terms.update(gradient_terms(self.run.model, self.run.setup))
        self.run.backend.begin(name, step)

    def step_end(self, step: int, optimizer) -> None:
        self.run.backend.after_optimizer_step(optimizer)
        self.run.backend.end()
        self.run.step_times.append(time.perf_counter() - self.start)
        self.on_event("step", {"step": step, "steps": self.run.options.steps, "seconds": self.run.step_times[-1]})


def load_model(setup: TrainSetup, weights: str | None, backend: Backend):
    """The model with random weights built on the device from the spec, or the checkpoint in `weights` loaded as
    `vlplan run` loads it (build.load_model: from_pretrained in the compute dtype with the setup's attention;
    QLoRA quantized by bitsandbytes while loading)."""
    if weights is None:
        with backend.creation():
            return build.create_model(setup)
    model = build.load_model(setup, Path(weights).expanduser())
    return model if setup.method == "qlora" else model.to(backend.device)


@contextlib.contextmanager
def random_checkpoint(setup: TrainSetup, backend: Backend):
    """QLoRA quantizes while loading a checkpoint: random weights are built on the device, written to a temporary
    directory and freed, so the measured load is the quantizing load alone."""
    with tempfile.TemporaryDirectory(prefix="vlplan-random-") as tmp:
        with backend.creation():
            model = build.create_model(setup)
        model.save_pretrained(tmp)
        del model
        gc.collect()
        backend.release()
        yield tmp


# Tensors by term ----------------------------------------------------------------------------------------------------
def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`, each rounded to the CUDA allocator's 512-byte blocks."""
    seen = set()
    total = 0
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            continue
        storage = tensor.untyped_storage()
        key = (storage.device, storage.data_ptr())
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += rounded_bytes(storage.nbytes())
    return total


def component_of(setup: TrainSetup, name: str) -> str:
    from .trace import _component

    return _component(setup.model.family, name)


def model_terms(model, setup: TrainSetup) -> dict[str, int]:
    """weights/<component> (frozen and fully trained parameters, buffers) and adapters/<component> (LoRA/DoRA)."""
    groups: dict[str, list] = {}
    for name, param in model.named_parameters():
        kind = "adapters" if "lora_" in name else "weights"
        groups.setdefault(f"{kind}/{component_of(setup, name)}", []).append(param)
        quant_state = getattr(param, "quant_state", None)  # bitsandbytes 4-bit: absmax and the nested state
        if quant_state is not None:
            groups[f"{kind}/{component_of(setup, name)}"] += _quant_state_tensors(quant_state)
    for name, buf in model.named_buffers():
        groups.setdefault(f"weights/{component_of(setup, name)}", []).append(buf)
    return {key: storage_bytes(tensors) for key, tensors in sorted(groups.items())}


def _quant_state_tensors(state) -> list:
    tensors = [getattr(state, key, None) for key in ("absmax", "code")]
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors += _quant_state_tensors(nested)
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def gradient_terms(model, setup: TrainSetup) -> dict[str, int]:
    """gradients/<component> after the last backward (all gradients; the estimate's breakdown holds those alive at
    its peak, so this is reported, not compared)."""
    groups: dict[str, list] = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            groups.setdefault(f"gradients/{component_of(setup, name)}", []).append(param.grad)
    return {key: storage_bytes(tensors) for key, tensors in sorted(groups.items())}


def optimizer_terms(optimizer) -> dict[str, int]:
    """optimizer/adam_states and optimizer/step_counters (0-dim tensors), named as the tracer and estimator do."""
    states, counters = [], []
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                (counters if value.dim() == 0 else states).append(value)
    terms = {"optimizer/adam_states": storage_bytes(states), "optimizer/step_counters": storage_bytes(counters)}
    return {k: v for k, v in terms.items() if v}


# Aggregation --------------------------------------------------------------------------------------------------------
def summarize(records: list[PhaseRecord], steps: int) -> dict[str, PhaseSummary]:
    """Per phase over the steady-state steps (2..N, or the only step): the largest peaks, the mean time per step.
    A phase split in pieces (gradient accumulation: two forwards per step) sums its time within a step."""
    steady = [r for r in records if r.phase == LOAD or (r.step >= 2 if steps >= 2 else r.step >= 1)]
    if not any(r.phase != LOAD for r in steady):  # an OOM in the first step: report what ran
        steady = records
    summaries = {}
    for phase in PHASES:
        mine = [r for r in steady if r.phase == phase]
        if not mine:
            continue
        per_step: dict[int, float] = {}
        for r in mine:
            per_step[r.step] = per_step.get(r.step, 0.0) + r.seconds
        peak = max(mine, key=lambda r: r.allocated_peak_bytes)
        summaries[phase] = PhaseSummary(
            phase, peak.allocated_peak_bytes, _max_or_none(r.reserved_peak_bytes for r in mine),
            _max_or_none(r.device_used_peak_bytes for r in mine), statistics.mean(per_step.values()),
            peak.breakdown_bytes)
    return summaries


def _max_or_none(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


def downsample(points: list[tuple], limit: int) -> list[tuple]:
    """At most `limit` points: per time bucket, the sample with the highest allocated bytes (peaks survive)."""
    if len(points) <= limit:
        return list(points)
    start, end = points[0][0], points[-1][0]
    width = (end - start) / limit or 1.0
    buckets: dict[int, tuple] = {}
    for point in points:
        index = min(int((point[0] - start) / width), limit - 1)
        if index not in buckets or point[1] > buckets[index][1]:
            buckets[index] = point
    return [buckets[i] for i in sorted(buckets)]


def _host_rss_peak_bytes() -> int | None:
    """The process's peak resident set (ru_maxrss: KiB on Linux, bytes on macOS)."""
    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):
        return None
    return peak if sys.platform == "darwin" else peak * 1024
