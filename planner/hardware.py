"""GPU catalog: usable memory, dense bf16/fp16 tensor throughput and memory bandwidth, ordered by memory.

`memory_mib` is the total the driver reports (`nvidia-smi --query-gpu=memory.total`, `torch.cuda.mem_get_info()[1]`),
which is what a training process can fill, not the marketing "80 GB". Throughput is the dense (non-sparse) bf16
tensor-core rate with fp32 accumulation from the vendor datasheet; `bf16` is False where the chip has no bf16 units
(V100, T4: fp16 only). Unknown GPUs are an error: pass `--gpu-memory-gib` instead of guessing.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from .errors import VlplanError

MIB = 2**20
GIB = 2**30


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


def custom_gpu(memory_gib: float) -> GPU:
    if memory_gib <= 0:
        raise VlplanError(f"--gpu-memory-gib must be positive, got {memory_gib}")
    return GPU(f"custom-{memory_gib:g}g", int(memory_gib * 1024), 0.0, 0.0, description=f"{memory_gib:g} GiB GPU")
