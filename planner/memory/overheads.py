"""Device memory outside live tensors, as named constants with their sources.

These are the terms a GPU run adds on top of `torch.cuda.max_memory_allocated` (what the tracer and the activation
model compute). They are deliberately few and named: `vlplan profile --sweep` measures them on real GPUs and
docs/memory-model.md records the calibration (device, versions, date). Until a calibration lands, the values below
come from published measurements, cited beside each.
"""

from __future__ import annotations

from ..units import GIB, MIB

# CUDA context plus the kernels loaded lazily during training (cuBLAS, cuDNN, fused attention, NCCL kernels).
# pytorch PR #86509: 274 MiB right after the first CUDA tensor with lazy module loading; pytorch #109888 (ptrblck):
# "around 400MB if CUDA >= 11.7"; unsloth-zoo PR #1053 (torch 2.10, CUDA 13): 426 MiB with nothing allocated.
# Training loads cuBLAS/cuDNN/attention kernels on top: budgeted at 600 MiB until calibrated on an H100.
CUDA_CONTEXT_BYTES = 600 * MIB

# cuBLAS workspace: 32 MiB per (handle, stream) on sm90 (aten/src/ATen/cuda/CublasHandlePool.cpp
# `parseChosenWorkspaceSize`, PR #89027), 8.125 MiB on other GPUs; one for the forward thread and one for the
# autograd engine's device thread. It is allocated through the caching allocator (`getNewWorkspace`:
# `c10::cuda::CUDACachingAllocator::get()->allocate(size)`), so it also shows in torch.cuda.max_memory_allocated
# on a GPU and holds its own segments (estimate.py `cublas_reserved_bytes`); it is a separate term here because the
# tracer cannot see it.
CUBLAS_WORKSPACE_HOPPER_BYTES = 32 * MIB
CUBLAS_WORKSPACE_OTHER_BYTES = 8519680
CUBLAS_WORKSPACES = 2

# Caching-allocator reserve (memory_reserved - memory_allocated at the peak): no constant. `estimate` replays the
# step's allocation sequence through a model of the caching allocator (planner/memory/allocator.py; estimate.py
# `_reserved`), and `vlplan trace` takes that term from the estimate (it replaced an 8% factor, pytorch #40989).

# NCCL communicator buffers (outside the caching allocator): NCCL_BUFFSIZE 4 MiB per channel and peer; measured
# 484-996 MiB at init on one GPU (NVIDIA/nccl PR #2366) and ~1.06 GiB on 8xH100 before all-to-all (NVIDIA/nccl #1685).
NCCL_BYTES = 768 * MIB

# Host memory of one training process besides offloaded states: Python, torch, CUDA host libraries, tokenizer,
# dataloader workers' share. Typical RSS of an idle CUDA torch process with transformers imported: ~2.5-3.5 GiB.
PROCESS_HOST_BYTES = 3 * GIB


def cublas_workspace_bytes(gpu_name: str) -> int:
    hopper = gpu_name.startswith(("h100", "h200", "h20", "h800"))
    per = CUBLAS_WORKSPACE_HOPPER_BYTES if hopper else CUBLAS_WORKSPACE_OTHER_BYTES
    return CUBLAS_WORKSPACES * per
