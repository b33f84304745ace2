"""Which kernel torch's CUDA `scaled_dot_product_attention` runs, per GPU, dtype, head dim and mask: one table that
the estimator (planner/memory/ops.py) and the tracer (profiler/emulate.py) both read, so their agreement does not
rest on one hand-written rule.

Source: aten/src/ATen/native/transformers/cuda/sdp_utils.cpp `select_sdp_backend` (read at pytorch/pytorch
001f694a): it walks `priority_order` and returns the first backend whose `can_use_*` checks pass.

- `priority_order`: the default order is flash, efficient, math, cudnn (aten/src/ATen/Context.h
  `sdp_priority_order`). `check_prefer_cudnn_attention` puts cuDNN first (cudnn, flash, efficient, math) on compute
  capability 9.x / 10.x (H100, H200, H20, B200; with CUDA < 13 only minor 0 or 3) when the runtime cuDNN is newer
  than 9.15 (`cudnn_version > 91500`) and TORCH_CUDNN_SDPA_DEPRIORITIZED is not set. Torch releases before that check
  (2.6-2.8) keep the default order everywhere; the torch builds vlplan models are the current ones, whose wheels
  bundle a cuDNN newer than 9.15 (`PREFER_CUDNN_ON_SM90`).
- `can_use_cudnn_attention`: fp16/bf16 (`check_dtypes_low_precision`), sm80-sm121 (`check_cudnn_hardware_support`),
  any mask of a broadcastable shape (`check_attn_mask_shape`), dropout a multiple of 1/16, head dims multiples of 8
  and <= 128, or <= 256 on sm90/sm10x with cuDNN > 9.22 (`check_cudnn_tensor_shapes`), whose backward takes
  d <= 128, 192/128 or 256/256 (`check_cudnn_d256_bprop_head_dim`).
- `can_use_flash_attention`: no mask (`check_for_attn_mask`), equal head dims <= 256
  (`check_head_dim_size_flash`), sm80-sm121, fp16/bf16, and on sm86/sm89/sm120/sm121 in training a head dim
  <= 192, or > 224 without dropout (`check_requires_grad_and_head_dim_gt192_constraints_on_sm86_89_or_120`).
- `can_use_mem_efficient_attention`: sm50-sm121, head dims divisible by `minimum_gemm_alignment` (8 for fp16/bf16
  with tensor cores, 4 for fp32 on sm80+, 1 for fp32 before), fp16/fp32/bf16 on sm80+, fp16/fp32 before.
- math: anything else.

ROCm (MI300X): flash and efficient attention both come from AOTriton; the same no-mask rule picks flash, masks pick
efficient. Unknown GPUs (`--gpu-memory-gib`): vlplan cannot know their architecture and keeps the Hopper row
(`UNKNOWN_ARCH`), the choice it made for every GPU before this table.
"""

from __future__ import annotations

from functools import lru_cache

CUDNN, FLASH, EFFICIENT, MATH = "cudnn", "flash", "efficient", "math"

# The current torch wheels bundle a cuDNN newer than 9.15, so `check_prefer_cudnn_attention` holds on sm90 / sm10x
PREFER_CUDNN_ON_SM90 = True

# Compute capability of each GPU of the catalog (planner/hardware.py), from NVIDIA's CUDA GPUs list
# (developer.nvidia.com/cuda-gpus); "rocm" for AMD.
GPU_ARCH: dict[str, tuple[int, int] | str] = {
    "t4-16g": (7, 5), "l4-24g": (8, 9), "a10g-24g": (8, 6), "rtx3090-24g": (8, 6), "rtx4090-24g": (8, 9),
    "rtx5090-32g": (12, 0), "v100-32g": (7, 0), "a100-40g": (8, 0), "l40s-48g": (8, 9), "a6000-48g": (8, 6),
    "a100-80g": (8, 0), "h100-pcie-80g": (9, 0), "h100-80g": (9, 0), "h20-96g": (9, 0), "h200-141g": (9, 0),
    "mi300x-192g": "rocm",
}
UNKNOWN_ARCH = (9, 0)

HALF = ("fp16", "bf16")


def gpu_arch(gpu_name: str) -> tuple[int, int] | str:
    return GPU_ARCH.get(gpu_name, UNKNOWN_ARCH)


def _within(arch: tuple[int, int], low: tuple[int, int], high: tuple[int, int]) -> bool:
    return low <= arch <= high  # `check_sm_version`: (major, minor) compared inclusively


def _cudnn_ok(arch, dtype: str, head_dim: int, head_dim_v: int, dropout: float, requires_grad: bool) -> bool:
    if dtype not in HALF or not _within(arch, (8, 0), (12, 1)) or dropout * 16 != int(dropout * 16):
        return False
    sm90_or_sm10x = arch == (9, 0) or arch[0] == 10
    limit = 256 if sm90_or_sm10x else 128
    if max(head_dim, head_dim_v) > limit or head_dim % 8 or head_dim_v % 8:
        return False
    if requires_grad and sm90_or_sm10x:  # check_cudnn_d256_bprop_head_dim
        return (head_dim <= 128 and head_dim_v <= 128) or (head_dim, head_dim_v) in ((192, 128), (256, 256))
    return True


def _flash_ok(arch, dtype: str, head_dim: int, head_dim_v: int, masked: bool, dropout: float,
              requires_grad: bool) -> bool:
    if masked or dtype not in HALF or head_dim != head_dim_v or head_dim > 256:
        return False
    if arch == "rocm":
        return True
    if not _within(arch, (8, 0), (12, 1)):
        return False
    if requires_grad and (_within(arch, (8, 6), (8, 9)) or _within(arch, (12, 0), (12, 1))):
        return head_dim <= 192 or (dropout == 0 and head_dim > 224)
    return True


def _efficient_ok(arch, dtype: str, head_dim: int, head_dim_v: int) -> bool:
    if arch == "rocm":
        return dtype in ("fp16", "bf16", "fp32") and head_dim % (8 if dtype in HALF else 4) == 0
    if not _within(arch, (5, 0), (12, 1)):
        return False
    if dtype == "bf16" and arch < (8, 0):
        return False
    alignment = 8 if dtype in HALF else (4 if arch >= (8, 0) else 1)  # minimum_gemm_alignment
    return head_dim % alignment == 0 and head_dim_v % alignment == 0


@lru_cache(maxsize=4096)
def sdpa_backend(gpu_name: str, dtype: str, head_dim: int, masked: bool, head_dim_v: int | None = None,
                 dropout: float = 0.0, requires_grad: bool = True) -> str:
    """The backend `select_sdp_backend` picks for dense (batch, heads, seq, dim) inputs of `dtype` on `gpu_name`
    (`masked`: an attn_mask is passed): "cudnn", "flash", "efficient" or "math"."""
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    arch = gpu_arch(gpu_name)
    cudnn_first = PREFER_CUDNN_ON_SM90 and arch != "rocm" and arch[0] in (9, 10)
    order = (CUDNN, FLASH, EFFICIENT, MATH) if cudnn_first else (FLASH, EFFICIENT, MATH, CUDNN)
    for backend in order:
        if backend == CUDNN and arch != "rocm" and _cudnn_ok(arch, dtype, head_dim, head_dim_v, dropout,
                                                             requires_grad):
            return CUDNN
        if backend == FLASH and _flash_ok(arch, dtype, head_dim, head_dim_v, masked, dropout, requires_grad):
            return FLASH
        if backend == EFFICIENT and _efficient_ok(arch, dtype, head_dim, head_dim_v):
            return EFFICIENT
        if backend == MATH:
            return MATH
    return MATH


# The head dims of the registry's attention layers (language models 64-256, ViTs 64-88): GPUs that pick the same
# backend for every one of them, in both half dtypes, with and without a mask, simulate alike.
_FINGERPRINT_HEAD_DIMS = (64, 72, 80, 88, 96, 112, 128, 192, 256)


@lru_cache(maxsize=256)
def sdpa_class(gpu_name: str) -> tuple[str, ...]:
    """The backends `gpu_name` picks over the head dims, dtypes and masks the simulation meets: part of the
    simulation's memo key (step.simulation_key), so GPUs that run the same kernels share one simulation."""
    return tuple(sdpa_backend(gpu_name, dtype, d, masked) for dtype in HALF for d in _FINGERPRINT_HEAD_DIMS
                 for masked in (False, True))
