"""GPU catalog: usable memory, dense bf16/fp16 tensor throughput and memory bandwidth, ordered by memory.

`memory_mib` is the total the driver reports (`nvidia-smi --query-gpu=memory.total`, `torch.cuda.mem_get_info()[1]`),
which is what a training process can fill, not the marketing "80 GB". Throughput is the dense (non-sparse) bf16
tensor-core rate with fp32 accumulation from the vendor datasheet; `bf16` is False where the chip has no bf16 units
(V100, T4: fp16 only). Unknown GPUs are an error: pass `--gpu-memory-gib` instead of guessing.
"""

from __future__ import annotations

import math
import os

import difflib
from dataclasses import dataclass
from pathlib import Path

from .errors import VlplanError
from .units import GIB, MIB


@dataclass(frozen=True)
class GPU:
    name: str
    memory_mib: int
    tflops_bf16: float  # dense tensor-core TFLOP/s (fp16 where bf16 is absent)
    bandwidth_gbps: float  # HBM/GDDR GB/s
    bf16: bool = True
    description: str = ""
    aliases: tuple[str, ...] = ()
    # Interconnect per GPU for data-parallel collectives, GB/s one direction (NVLink where present, else PCIe)
    link_gbps: float = 25.0

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB


# Sources: NVIDIA datasheets (A100, H100, H200, H20, L40S, L4, A10, RTX A6000, RTX 30/40/50 series whitepapers,
# V100, T4) and AMD's MI300X datasheet for throughput/bandwidth; memory_mib from nvidia-smi totals of those boards
# (H100 80GB HBM3: 81559 MiB, H200: 143771 MiB, A100 80GB: 81920 MiB, A100 40GB: 40960 MiB).
CATALOG: tuple[GPU, ...] = (
    GPU("t4-16g", 15360, 65.0, 320, bf16=False, description="NVIDIA T4 16GB", aliases=("t4",), link_gbps=16),
    GPU("l4-24g", 23034, 121.0, 300, description="NVIDIA L4 24GB", aliases=("l4",), link_gbps=32),
    GPU("a10g-24g", 23028, 70.0, 600, description="NVIDIA A10G 24GB (AWS g5)", aliases=("a10g", "a10"), link_gbps=16),
    GPU("rtx3090-24g", 24576, 71.0, 936, description="GeForce RTX 3090 24GB", aliases=("rtx3090", "3090"),
        link_gbps=16),
    GPU("rtx4090-24g", 24564, 165.2, 1008, description="GeForce RTX 4090 24GB", aliases=("rtx4090", "4090"),
        link_gbps=16),
    GPU("rtx5090-32g", 32607, 209.5, 1792, description="GeForce RTX 5090 32GB", aliases=("rtx5090", "5090"),
        link_gbps=32),
    GPU("v100-32g", 32768, 125.0, 900, bf16=False, description="NVIDIA V100 SXM2 32GB", aliases=("v100",),
        link_gbps=150),
    GPU("a100-40g", 40960, 312.0, 1555, description="NVIDIA A100 SXM4 40GB", aliases=("a100-40gb",),
        link_gbps=300),
    GPU("l40s-48g", 46068, 362.1, 864, description="NVIDIA L40S 48GB", aliases=("l40s",), link_gbps=32),
    GPU("a6000-48g", 49140, 154.8, 768, description="NVIDIA RTX A6000 48GB", aliases=("a6000", "rtx-a6000"),
        link_gbps=56),
    GPU("a100-80g", 81920, 312.0, 2039, description="NVIDIA A100 SXM4 80GB", aliases=("a100", "a100-80gb"),
        link_gbps=300),
    GPU("h100-pcie-80g", 81559, 756.0, 2000, description="NVIDIA H100 PCIe 80GB", aliases=("h100-pcie",),
        link_gbps=64),
    GPU("h100-80g", 81559, 989.4, 3350, description="NVIDIA H100 SXM5 80GB", aliases=("h100", "h100-sxm", "h800"),
        link_gbps=450),
    GPU("h20-96g", 97871, 148.0, 4000, description="NVIDIA H20 96GB", aliases=("h20",), link_gbps=450),
    GPU("h200-141g", 143771, 989.4, 4800, description="NVIDIA H200 SXM 141GB", aliases=("h200",), link_gbps=450),
    GPU("mi300x-192g", 196592, 1307.4, 5300, description="AMD Instinct MI300X 192GB", aliases=("mi300x",),
        link_gbps=448),
)


def gpu_names() -> list[str]:
    return [gpu.name for gpu in CATALOG]


def find_gpu(name: str) -> GPU:
    key = name.strip().lower()
    for gpu in CATALOG:
        if key == gpu.name or key in gpu.aliases:
            return gpu
    close = difflib.get_close_matches(key, [*gpu_names(), *(a for g in CATALOG for a in g.aliases)], n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise VlplanError(f"unknown GPU {name!r}{hint} (see `vlplan gpus`, or pass --gpu-memory-gib for another GPU)")


# Bound on a GPU's memory: a typo (extra zeros, 1e308) is refused with the bound named
MAX_GPU_MEMORY_GIB = 2**16  # 64 TiB per device, about 200x the largest GPU (AMD MI355X, 288 GB)


def custom_gpu(memory_gib: float) -> GPU:
    # nan and inf passed `<= 0` and crashed in int() (ValueError/OverflowError tracebacks); 1e308 * 1024 is inf
    if not (math.isfinite(memory_gib) and 0 < memory_gib <= MAX_GPU_MEMORY_GIB):
        raise VlplanError(f"--gpu-memory-gib must be a positive number of GiB up to {MAX_GPU_MEMORY_GIB}, got "
                          f"{memory_gib}")
    return GPU(f"custom-{memory_gib:g}g", int(memory_gib * 1024), 0.0, 0.0, description=f"{memory_gib:g} GiB GPU")


# Host RAM ------------------------------------------------------------------------------------------------------------
# A plan that offloads to the CPU fits only if the node has the host RAM for it. When the user does not say how much
# (`--host-ram-gib`) and the plan is not for this machine, vlplan assumes the host RAM per GPU of a common server of
# that GPU, stated here with the machine it comes from. AWS figures: the instance-type tables of the AWS Batch user
# guide (docs.aws.amazon.com/batch/latest/userguide/gpu-jobs.html) and the EC2 accelerated-computing instance pages;
# Azure: the ND MI300X v5 size page; Lambda: its on-demand instance list. Consumer and workstation cards have no
# reference server: 64 GiB per card is an assumption (a 2-card workstation with 128 GiB).
@dataclass(frozen=True)
class HostRamAssumption:
    gib_per_gpu: float
    source: str


_WORKSTATION = "assumed: a workstation with 64 GiB of RAM per card, no reference server"
HOST_RAM_PER_GPU: dict[str, HostRamAssumption] = {
    "t4-16g": HostRamAssumption(48, "AWS g4dn.12xlarge: 4 x T4, 192 GiB"),
    "l4-24g": HostRamAssumption(96, "AWS g6.48xlarge: 8 x L4, 768 GiB"),
    "a10g-24g": HostRamAssumption(96, "AWS g5.48xlarge: 8 x A10G, 768 GiB"),
    "rtx3090-24g": HostRamAssumption(64, _WORKSTATION),
    "rtx4090-24g": HostRamAssumption(64, _WORKSTATION),
    "rtx5090-32g": HostRamAssumption(64, _WORKSTATION),
    "v100-32g": HostRamAssumption(96, "AWS p3dn.24xlarge: 8 x V100 32GB, 768 GiB"),
    "a100-40g": HostRamAssumption(144, "AWS p4d.24xlarge: 8 x A100 40GB, 1152 GiB"),
    "l40s-48g": HostRamAssumption(192, "AWS g6e.48xlarge: 8 x L40S, 1536 GiB"),
    "a6000-48g": HostRamAssumption(64, _WORKSTATION),
    "a100-80g": HostRamAssumption(144, "AWS p4de.24xlarge: 8 x A100 80GB, 1152 GiB"),
    "h100-pcie-80g": HostRamAssumption(200, "Lambda 1x H100 PCIe instance: 200 GiB"),
    "h100-80g": HostRamAssumption(256, "AWS p5.48xlarge: 8 x H100, 2048 GiB"),
    "h20-96g": HostRamAssumption(256, "assumed like an 8 x H100 server with 2048 GiB, no public reference"),
    "h200-141g": HostRamAssumption(256, "AWS p5e.48xlarge: 8 x H200, 2048 GiB"),
    "mi300x-192g": HostRamAssumption(231.25, "Azure ND MI300X v5: 8 x MI300X, 1850 GiB"),
}


def assumed_host_ram(gpu: GPU, gpus_per_node: int) -> tuple[int, str]:
    """Host RAM per node assumed for `gpus_per_node` x `gpu`, in bytes, and where the number comes from. A GPU given
    by its memory only takes the assumption of the catalog GPU closest in memory (said in the reason)."""
    assumption = HOST_RAM_PER_GPU.get(gpu.name)
    like = ""
    if assumption is None:
        nearest = min(CATALOG, key=lambda g: (abs(g.memory_mib - gpu.memory_mib), g.memory_mib))
        assumption, like = HOST_RAM_PER_GPU[nearest.name], f"a GPU of unknown kind, taken as {nearest.name}: "
    total = int(assumption.gib_per_gpu * gpus_per_node * GIB)
    return total, (f"{assumption.gib_per_gpu:g} GiB per GPU x {gpus_per_node}, {like}{assumption.source}; "
                   "pass --host-ram-gib for your machine")


# `--host-ram-gib` above this is a typo, not a machine (1 PiB per node)
MAX_HOST_RAM_GIB = 2**20


def host_ram_budget(setup, host_ram_gib: float | None) -> tuple[int | None, str | None]:
    """The host RAM budget per node and where it comes from: `host_ram_gib` (--host-ram-gib) when given; else this
    machine's RAM when the plan is for this machine, i.e. one node and at least `num_gpus` NVIDIA GPUs here (seen
    through NVML) whose memory is the planned GPU's within 2% (the physical RAM, or the container's cgroup limit
    where lower); else (None, None): the planner's stated assumption for the GPU type (HOST_RAM_PER_GPU)."""
    if host_ram_gib is not None:
        if not math.isfinite(host_ram_gib) or not 0 < host_ram_gib <= MAX_HOST_RAM_GIB:
            raise VlplanError(f"--host-ram-gib must be a number of GiB in (0, {MAX_HOST_RAM_GIB}], got {host_ram_gib}")
        return int(host_ram_gib * GIB), "--host-ram-gib"
    local = _local_gpus_mib()
    if setup.num_nodes == 1 and len(local) >= setup.num_gpus and all(
            abs(mib - setup.gpu.memory_mib) <= 0.02 * setup.gpu.memory_mib for mib in local[:setup.num_gpus]):
        ram = _this_machine_ram_bytes()
        if ram:
            return ram, f"this machine's RAM (the plan is for its {len(local)} GPU(s) of {setup.gpu.name}'s memory)"
    return None, None


def _local_gpus_mib() -> list[int]:
    """Total memory (MiB) of each NVIDIA GPU NVML sees here; none without the driver or nvidia-ml-py."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no nvidia-ml-py, no driver, no GPU: this machine is not the planned one
        return []
    try:
        return [int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total // 2**20)
                for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _this_machine_ram_bytes() -> int | None:
    """Physical RAM, or the cgroup (container) memory limit where lower."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            ram = min(ram, int(text))
    return ram
