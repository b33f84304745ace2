"""The cuda backend of `profile`: what a real GPU step uses, read from torch.cuda and NVML.

Per phase (`PhaseRecord`): `torch.cuda.max_memory_allocated` (live tensors in the caching allocator's blocks, cuBLAS
workspaces included), `torch.cuda.max_memory_reserved` (the allocator's segments) and NVML's device memory used
(`nvmlDeviceGetMemoryInfo().used`, less what was in use before this process created its CUDA context: what
nvidia-smi adds for this process), the NVML peak taken over a sampler thread and the phase ends.

Outside the allocator: the CUDA context size right after initialization (`context_init_bytes`: NVML used - baseline
- reserved), everything NVML sees beyond the allocator at the end of the steps (`non_allocator_bytes`: the context
plus the kernels and library handles loaded lazily during training, the estimate's `cuda/context`), and the cuBLAS
workspaces (`cublas_workspace_bytes`: what a forward and a backward matmul leave allocated once their tensors are
gone, the estimate's `cuda/cublas_workspace`).

NVML is read without creating a CUDA context (device index from CUDA_VISIBLE_DEVICES), so a sweep's parent process
holds no GPU memory.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

from vlplan.planner.errors import VlplanError
from vlplan.planner.setup import TrainSetup
from vlplan.planner.units import GIB

from .profile import Backend, PhaseRecord, ProfileOptions

class NoCudaError(VlplanError):
    """This machine has no CUDA device (torch.cuda.is_available() is False)."""


NO_CUDA = ("vlplan profile needs a CUDA GPU and torch.cuda.is_available() is False here; run it on a GPU machine "
           "(docs/profile.md), or pass --backend cpu for the CPU test/dev backend")
SNAPSHOT_MAX_ENTRIES = 200_000


# NVML, without a CUDA context -----------------------------------------------------------------------------------
def nvml_handle():
    """The NVML handle of CUDA device 0 of this process (CUDA_VISIBLE_DEVICES' first entry, an index or a UUID), or
    None where NVML (nvidia-ml-py) is missing or finds no such device."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        if visible.startswith(("GPU-", "MIG-")):
            return pynvml.nvmlDeviceGetHandleByUUID(visible)
        return pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible else 0)
    except (pynvml.NVMLError, ValueError):
        return None


def nvml_used_bytes(handle) -> int | None:
    import pynvml

    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except pynvml.NVMLError:
        return None


def nvml_device() -> dict | None:
    """Name, total memory and driver of device 0 through NVML (no CUDA context), or None."""
    handle = nvml_handle()
    if handle is None:
        return None
    import pynvml

    name = pynvml.nvmlDeviceGetName(handle)
    driver = pynvml.nvmlSystemGetDriverVersion()
    return {"name": name.decode() if isinstance(name, bytes) else name,
            "total_memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
            "driver": driver.decode() if isinstance(driver, bytes) else driver}


# The backend ----------------------------------------------------------------------------------------------------
class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, options: ProfileOptions) -> None:
        super().__init__(options)
        if not torch.cuda.is_available():
            raise NoCudaError(NO_CUDA)
        self.device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_initialized() else 0)
        self.handle = nvml_handle()
        if self.handle is None:
            raise VlplanError("vlplan profile reads device memory with NVML and found none: pip install nvidia-ml-py "
                              "(the 'gpu' extra)")
        self.baseline_bytes: int | None = None
        self.context_init_bytes: int | None = None
        self.cublas_workspace_bytes = 0
        self.non_allocator_bytes: int | None = None
        self._samples: list[tuple] = []
        self._used_peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._snapshot_dumped = False

    @contextlib.contextmanager
    def session(self, setup: TrainSetup):
        if torch.cuda.is_initialized():
            self.warnings.append("CUDA was initialized before the profile began: the context size is not measured "
                                 "and the device-used peaks leave out the context (they count from the memory in use "
                                 "when the profile began)")
        else:
            self.baseline_bytes = nvml_used_bytes(self.handle)
        torch.cuda.set_device(self.device)
        torch.zeros(1, device=self.device)
        torch.cuda.synchronize(self.device)
        if self.baseline_bytes is None:
            self.baseline_bytes = nvml_used_bytes(self.handle) - torch.cuda.memory_reserved(self.device)
        else:
            self.context_init_bytes = (nvml_used_bytes(self.handle) - self.baseline_bytes
                                       - torch.cuda.memory_reserved(self.device))
        self.cublas_workspace_bytes = self._cublas_workspace(setup)
        if self.options.memory_limit_bytes is not None:
            total = torch.cuda.get_device_properties(self.device).total_memory
            if self.options.memory_limit_bytes >= total:
                raise VlplanError(f"--memory-limit-gib {self.options.memory_limit_bytes / GIB:.2f} is not below "
                                  f"the device's {total / GIB:.2f} GiB")
            torch.cuda.set_per_process_memory_fraction(self.options.memory_limit_bytes / total, self.device)
        if self.options.snapshot:
            torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_MAX_ENTRIES, stacks="python")
        torch.cuda.reset_peak_memory_stats(self.device)
        sampler = threading.Thread(target=self._sample_loop, name="vlplan-memory-sampler", daemon=True)
        sampler.start()
        try:
            yield
        finally:
            self._stop.set()
            sampler.join()
            if self.options.snapshot:
                if not self._snapshot_dumped:
                    torch.cuda.memory._dump_snapshot(self.options.snapshot)
                torch.cuda.memory._record_memory_history(enabled=None)
            if self.options.memory_limit_bytes is not None:
                torch.cuda.set_per_process_memory_fraction(1.0, self.device)

    def _cublas_workspace(self, setup: TrainSetup) -> int:
        """Bytes a forward and a backward matmul (plain and with bias, cuBLAS and cuBLASLt paths) leave allocated
        once their own tensors are freed: the workspaces of the forward thread's and the autograd thread's handles,
        which stay for the life of the process."""
        from .build import compute_dtype

        before = torch.cuda.memory_allocated(self.device)
        dtype = compute_dtype(setup)
        x = torch.randn(64, 256, device=self.device, dtype=dtype, requires_grad=True)
        w = torch.randn(256, 256, device=self.device, dtype=dtype, requires_grad=True)
        b = torch.randn(256, device=self.device, dtype=dtype, requires_grad=True)
        (torch.nn.functional.linear(x, w, b).sum() + (x @ w).sum()).backward()
        torch.cuda.synchronize(self.device)
        del x, w, b
        return torch.cuda.memory_allocated(self.device) - before

    def _used(self) -> int:
        used = nvml_used_bytes(self.handle)
        return 0 if used is None else used - self.baseline_bytes

    def _sample_loop(self) -> None:
        interval = self.options.sample_interval_s
        while not self._stop.wait(interval):
            self._sample()

    def _sample(self) -> None:
        point = (self.now(), torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device),
                 self._used())
        with self._lock:
            self._samples.append(point)
            self._used_peak = max(self._used_peak, point[3])

    # Phases
    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def _open(self, phase: str) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)
        with self._lock:
            self._used_peak = self._used()

    def _close(self, phase: str, step: int, start: float, end: float) -> PhaseRecord:
        self._sample()
        with self._lock:
            used = self._used_peak
        self.non_allocator_bytes = max(self.non_allocator_bytes or 0,
                                       self._used() - torch.cuda.memory_reserved(self.device))
        return PhaseRecord(phase, step, start, end, torch.cuda.max_memory_allocated(self.device),
                           torch.cuda.max_memory_reserved(self.device), used)

    def autocast(self, dtype: torch.dtype):
        return torch.autocast("cuda", dtype=dtype)

    def creation(self):
        return torch.device(self.device)

    def allocated_bytes(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def release(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()

    def device_info(self) -> dict:
        props = torch.cuda.get_device_properties(self.device)
        info = nvml_device() or {}
        return {"name": props.name, "backend": "cuda", "total_memory_bytes": int(props.total_memory),
                "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
                "driver": info.get("driver"), "memory_limit_bytes": self.options.memory_limit_bytes,
                "cudnn": torch.backends.cudnn.version()}

    def overheads(self) -> dict:
        return {"context_init_bytes": self.context_init_bytes, "non_allocator_bytes": self.non_allocator_bytes,
                "cublas_workspace_bytes": self.cublas_workspace_bytes, "baseline_used_bytes": self.baseline_bytes}

    def timeline(self) -> list[tuple]:
        with self._lock:
            return sorted(self._samples)

    def on_oom(self) -> None:
        """Dump the snapshot while the memory that ran out is still held (memory_viz then shows the state at the
        error, not after the clean-up)."""
        if self.options.snapshot:
            torch.cuda.memory._dump_snapshot(self.options.snapshot)
            self._snapshot_dumped = True

    def oom_detail(self) -> dict:
        return {"memory_limit_bytes": self.options.memory_limit_bytes,
                "snapshot": self.options.snapshot}
