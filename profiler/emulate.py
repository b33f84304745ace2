"""What CUDA does differently from the CPU, emulated for the tracer.

The tracer runs on CPU tensors (a CPU-only torch cannot fake CUDA tensors through autograd), so the allocations
that differ between the CUDA and CPU implementations are reproduced here:

- Autocast: CUDA's op lists differ from the CPU's (norms and softmax in fp32, ...): `cuda_autocast.py`.
- Attention: `F.scaled_dot_product_attention` on CUDA with fp16/bf16 inputs, no mask and head_dim <= 256 runs a fused
  kernel, the one the planner's table gives for the setup's GPU (planner/memory/sdpa.py, from sdp_utils.cpp: cuDNN
  attention on Hopper, FlashAttention-2 on other sm80+ GPUs, memory-efficient attention with a mask or before sm80;
  aten/src/ATen/native/transformers/cuda/attention.cu). Its output is laid out (batch, seq, heads, dim) and returned transposed, so transformers'
  following `.transpose(1, 2).contiguous()` copies nothing; the CPU kernel returns (batch, heads, seq, dim), which
  costs one more copy downstream. `CudaAttention` reproduces the CUDA kernels' saved tensors and workspaces.
- Dropout: `F.dropout` with 0 < p < 1 in training runs CUDA's fused `native_dropout` (output + bool mask, the mask
  saved; aten/src/ATen/native/Dropout.cpp `is_fused_kernel_acceptable`); on the CPU `at::dropout` multiplies by a
  noise tensor in the input's dtype instead (4 bytes per element for fp32 LoRA inputs, not 1): `cuda_dropout`.
- The HF Trainer's forward (accelerate `convert_outputs_to_fp32`) returns fp32 copies of half-precision outputs:
  done with accelerate's own wrapper in `trace.py`.
- Host-side checks: transformers validates placeholder counts with data-dependent tensor conditions
  (`torch_compilable_check`), which fake tensors cannot evaluate; the tracer builds consistent batches, so the checks
  are skipped.

`tracker_paused` lets an emulation compute values (needed for real-tensor runs) without counting the kernel's
internal buffers, then allocate exactly what the CUDA kernel allocates.
"""

from __future__ import annotations

import contextlib
import math
import sys

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from vlplan.planner.memory.sdpa import CUDNN, EFFICIENT, FLASH, MATH, sdpa_backend

_ACTIVE_TRACKER = None  # set by `cuda_emulation` when a MemoryTracker is in use


def fake_mode() -> FakeTensorMode:
    return FakeTensorMode(allow_non_fake_inputs=True)


def set_tracker(tracker) -> None:
    global _ACTIVE_TRACKER
    _ACTIVE_TRACKER = tracker


@contextlib.contextmanager
def tracker_paused():
    tracker = _ACTIVE_TRACKER
    if tracker is None:
        yield
        return
    was = tracker.paused
    tracker.paused = True
    try:
        yield
    finally:
        tracker.paused = was


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# The GPU whose SDPA kernel choice the trace reproduces (`cuda_emulation` sets it from the setup): the choice itself
# is the planner's table (planner/memory/sdpa.py `sdpa_backend`, from sdp_utils.cpp), shared with the estimator.
_GPU_NAME = ""


class CudaAttention(torch.autograd.Function):
    """torch's CUDA fused attention (cuDNN or FlashAttention-2): CPU values, CUDA allocations.

    Forward (attention.cu): the output is allocated in the query's (batch, seq, heads, dim) layout and returned as a
    (batch, heads, seq, dim) view; a fp32 logsumexp of (batch, heads, seq) (cuDNN: a trailing 1) is saved with q, k,
    v and the output. Backward: dq, dk, dv like q, k, v, plus the kernel workspace: FlashAttention-2 `mha_bwd`
    allocates `softmax_d` fp32 (batch, heads, seq rounded to 128) and `dq_accum` fp32 (batch, seq rounded to 128,
    heads, dim rounded to 32/64), and with grouped-query attention dk/dv per query head before summing the groups;
    cuDNN's backward workspace holds a fp32 dQ accumulator and a fp32 softmax sum (b*h*s*d*4 + b*h*s*4 bytes).
    With a mask, cuDNN takes it as an additive bias (`attn_bias`), which the backward keeps with q, k, v
    (derivatives.yaml `_scaled_dot_product_cudnn_attention`: attn_bias is an argument of the backward).
    """

    @staticmethod
    def forward(ctx, query, key, value, is_causal, scale, backend, attn_bias=None):
        batch, heads, seq_q, _ = query.shape
        with tracker_paused():
            values = _original_sdpa(query, key, value, attn_mask=attn_bias, is_causal=is_causal, scale=scale,
                                    enable_gqa=key.shape[1] != heads)
            out = torch.empty(batch, seq_q, heads, value.shape[-1], dtype=query.dtype,
                              device=query.device).transpose(1, 2)
        _track(out)
        with tracker_paused():
            out.copy_(values)
            del values
        # the fp32 logsumexp: cuDNN (batch, heads, seq, 1), FlashAttention-2 (batch, heads, seq), memory-efficient
        # attention (batch, heads, seq rounded up to kAlignLSE = 32)
        lse_shape = {CUDNN: (batch, heads, seq_q, 1), FLASH: (batch, heads, seq_q),
                     EFFICIENT: (batch, heads, _round_up(seq_q, 32))}[backend]
        logsumexp = torch.empty(lse_shape, dtype=torch.float32, device=query.device)
        ctx.save_for_backward(query, key, value, out, logsumexp, attn_bias)
        ctx.is_causal, ctx.scale, ctx.backend = is_causal, scale, backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, logsumexp, attn_bias = ctx.saved_tensors
        batch, heads, seq_q, dim = query.shape
        kv_heads = key.shape[1]
        device = query.device
        if ctx.backend != FLASH:  # cuDNN; memory-efficient attention modelled with cuDNN's workspace (sdpa.py)
            workspace = [torch.empty(batch, heads, seq_q, dim, dtype=torch.float32, device=device),
                         torch.empty(batch, heads, seq_q, dtype=torch.float32, device=device)]
            dq, dk, dv = (_empty_like_layout(t) for t in (query, key, value))
        else:
            dim_rounded = _round_up(dim, 32 if dim <= 128 else 64)
            workspace = [torch.empty(batch, heads, _round_up(seq_q, 128), dtype=torch.float32, device=device),
                         torch.empty(batch, _round_up(seq_q, 128), heads, dim_rounded, dtype=torch.float32,
                                     device=device)]
            dq = _empty_like_layout(query)
            if kv_heads != heads:
                seq_k = key.shape[2]
                expanded = [torch.empty(batch, seq_k, heads, t.shape[-1], dtype=t.dtype, device=device)
                            for t in (key, value)]
                dk, dv = (e.view(batch, seq_k, kv_heads, heads // kv_heads, -1).sum(3).transpose(1, 2)
                          for e in expanded)
                del expanded
            else:
                dk, dv = _empty_like_layout(key), _empty_like_layout(value)
        del workspace
        with tracker_paused(), torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (query, key, value)]
            values = _original_sdpa(*inputs, attn_mask=attn_bias, is_causal=ctx.is_causal, scale=ctx.scale,
                                    enable_gqa=kv_heads != heads)
            grads = torch.autograd.grad(values, inputs, grad_out)
            for target, grad in zip((dq, dk, dv), grads):
                target.copy_(grad)
            del grads, values, inputs
        return dq, dk, dv, None, None, None, None


def _empty_like_layout(t: torch.Tensor) -> torch.Tensor:
    """`torch.empty_like` of a (batch, heads, seq, dim) view of a (batch, seq, heads, dim) buffer keeps that layout."""
    b, h, s, d = t.shape
    return torch.empty(b, s, h, d, dtype=t.dtype, device=t.device).transpose(1, 2)


def _track(tensor) -> None:
    if _ACTIVE_TRACKER is not None:
        _ACTIVE_TRACKER.track(tensor)


_original_sdpa = F.scaled_dot_product_attention


def cuda_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
              **kwargs):
    """F.scaled_dot_product_attention with CUDA's kernel choice for the traced setup's GPU (planner/memory/sdpa.py
    `sdpa_backend`): cuDNN, FlashAttention-2 or memory-efficient attention for fp16/bf16 without dropout; fp32, the
    math kernel and anything else run the original function (the estimator's eager path)."""
    if torch.is_autocast_enabled("cpu"):
        # scaled_dot_product_attention is in autocast's lower-precision list: the dispatcher casts q, k, v first
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = (t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
                             for t in (query, key, value))
    backend = MATH
    if dropout_p == 0.0 and query.dim() == 4 and (attn_mask is None or attn_mask.dim() == 4) and query.dtype in _DTYPES:
        backend = sdpa_backend(_GPU_NAME, _DTYPES[query.dtype], query.shape[-1], attn_mask is not None,
                               value.shape[-1])
    if backend == MATH or (backend == EFFICIENT and query.dtype == torch.float32):
        return _original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, enable_gqa=enable_gqa, **kwargs)
    if attn_mask is not None:
        return _masked_sdpa(query, key, value, attn_mask, is_causal, scale, backend)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    return CudaAttention.apply(query, key, value, bool(is_causal), scale, backend)


_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


_original_dropout = F.dropout


def cuda_dropout(input, p=0.5, training=True, inplace=False):
    """F.dropout as CUDA runs it: `at::dropout` takes `native_dropout` when 0 < p < 1, in training, on a non-empty
    tensor (Dropout.cpp `is_fused_kernel_acceptable` is true for CUDA tensors), so the saved tensor is a bool mask.
    Anything else (p == 0, eval, in place) runs the original function, which returns the input or the same kernels."""
    if training and 0.0 < p < 1.0 and not inplace and input.numel() > 0:
        return torch.native_dropout(input, p, True)[0]
    return _original_dropout(input, p, training, inplace)


def _masked_sdpa(query, key, value, attn_mask, is_causal, scale, backend):
    """CUDA SDPA with a mask (Gemma 3's sliding-window and image-bidirectional masks): no FlashAttention; cuDNN
    attention takes masks (sdp_utils.cpp `can_use_cudnn_attention` checks only the mask's shape) and is first in the
    priority order on Hopper, memory-efficient attention runs elsewhere (planner/memory/sdpa.py). attention.cpp `convert_boolean_attn_mask_cudnn` turns a bool mask into
    an additive bias of the query dtype, `where(mask.logical_not(), -65504, 0)` (a transient bool tensor, then the
    bias, both of the mask's shape); under autocast a float mask is cast like q, k and v. transformers passes no
    `enable_gqa` with a mask (`use_gqa_in_sdpa`), so K and V arrive already expanded by `repeat_kv`."""
    if attn_mask.dtype == torch.bool:
        bias = torch.where(attn_mask.logical_not(), -65504.0, torch.scalar_tensor(0.0, dtype=query.dtype))
    else:
        bias = attn_mask.to(query.dtype) if torch.is_autocast_enabled("cpu") else attn_mask
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    return CudaAttention.apply(query, key, value, bool(is_causal), scale, backend, bias)


def _apply_by_replacing(self, fn, recurse=True):
    """`nn.Module._apply` that replaces parameters instead of swapping them: swapping fake parameters fails while
    FakeTensorMode holds weak references to them. Safe during model building, before anything else holds them."""
    if recurse:
        for module in self.children():
            module._apply(fn)
    for key, param in self._parameters.items():
        if param is None:
            continue
        with torch.no_grad():
            applied = fn(param)
        if applied is not param:
            self._parameters[key] = torch.nn.Parameter(applied, requires_grad=param.requires_grad)
    for key, buf in self._buffers.items():
        if buf is not None:
            self._buffers[key] = fn(buf)
    return self


def _trunc_normal_without_host_sync(tensor, mean, std, a, b, generator=None):
    """torch.nn.init's truncated normal resamples until `mask.any()` is false, a host read fake tensors cannot do
    (SigLIP's `lecun_normal_` init); the values of fake weights do not matter, only that the init allocates nothing."""
    with torch.no_grad():
        return tensor.normal_(mean, std, generator=generator)


@contextlib.contextmanager
def fake_module_conversions():
    original = torch.nn.Module._apply
    torch.nn.Module._apply = _apply_by_replacing
    trunc_normal = torch.nn.init._no_grad_trunc_normal_
    torch.nn.init._no_grad_trunc_normal_ = _trunc_normal_without_host_sync
    try:
        yield
    finally:
        torch.nn.Module._apply = original
        torch.nn.init._no_grad_trunc_normal_ = trunc_normal


_original_masked_scatter = torch.Tensor.masked_scatter


def cuda_masked_scatter(self, mask, source):
    """Tensor.masked_scatter as CUDA runs it (IndexKernel.cu `masked_scatter__cuda`): besides the output, an int64
    prefix sum over the mask expanded to self's shape and a contiguous copy of that mask live during the kernel."""
    out = _original_masked_scatter(self, mask, source)
    with torch.no_grad():
        prefix_sum = torch.empty(self.shape, dtype=torch.int64, device=self.device)
        mask_contiguous = torch.empty(self.shape, dtype=torch.bool, device=self.device)
        del prefix_sum, mask_contiguous
    return out


def _skip_host_checks():
    """Replace transformers' data-dependent `torch_compilable_check` in every loaded modeling module."""
    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("transformers") and hasattr(module, "torch_compilable_check"):
            patched.append((module, module.torch_compilable_check))
            module.torch_compilable_check = lambda *args, **kwargs: None
    return patched


def _grouped_mm_meta(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    """aten::_grouped_mm's output for any float dtype. torch's meta kernel accepts bf16 only, but CUDA's
    `_grouped_mm_cuda` (aten/src/ATen/native/cuda/GroupedBlas.cpp) runs other dtypes through `_grouped_mm_fallback`
    (one mm per group into the output, of the inputs' dtype): transformers' grouped_mm experts (Qwen3-VL-MoE) upcast to
    fp32 for full fine-tuning take that path."""
    from torch._meta_registrations import _create_grouped_mm_output_tensor

    return _create_grouped_mm_output_tensor(mat_a, mat_b, offs, out_dtype or mat_a.dtype)


@contextlib.contextmanager
def _grouped_mm_any_float():
    import warnings

    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        lib.impl("_grouped_mm", _grouped_mm_meta, "Meta")
    try:
        yield
    finally:
        lib._destroy()


@contextlib.contextmanager
def cuda_emulation(setup, *, fake: bool = True):
    """Patch torch/transformers for the duration of a trace (restored on exit)."""
    import transformers  # noqa: F401  (modeling modules must be imported before patching their globals)

    from torch._subclasses import fake_tensor

    global _GPU_NAME
    gpu_name, _GPU_NAME = _GPU_NAME, setup.gpu.name
    F.scaled_dot_product_attention = cuda_sdpa
    F.dropout = cuda_dropout
    torch.Tensor.masked_scatter = cuda_masked_scatter
    patched = _skip_host_checks() if fake else []
    if fake:
        # masking_utils.find_packed_sequence_indices looks for packed sequences in position_ids and, on fake tensors,
        # cannot tell there are none, so LLaMA-style models (position_ids from an arange) would get a dense
        # (batch, 1, seq, seq) mask that the real run skips (is_causal). Synthetic batches hold one sequence per row.
        from transformers import masking_utils

        find_packed = masking_utils.find_packed_sequence_indices
        masking_utils.find_packed_sequence_indices = lambda position_ids: None
        # masking_utils reads padding masks on the host to skip an all-ones mask (`padding_mask.all()`), but never on
        # a fake tensor (`is_tracing`). A constant fake (e.g. Idefics3's patch mask, from constant pixel masks) has
        # known values: read them, as the real run does, so no (batch, 1, n, n) mask appears that the run skips.
        tracing = masking_utils.is_tracing
        masking_utils.is_tracing = lambda tensor=None: tracing(
            None if getattr(tensor, "constant", None) is not None else tensor)
    # Fake tensors propagate constants only up to one element; the vision index tensors (cu_seqlens of windows,
    # split sizes) are read on the host with .tolist(), so keep small integer results constant too.
    numel_limit = fake_tensor.CONSTANT_NUMEL_LIMIT
    fake_tensor.CONSTANT_NUMEL_LIMIT = 1 << 16
    grouped_mm = _grouped_mm_any_float() if fake else contextlib.nullcontext()
    try:
        with grouped_mm:
            yield
    finally:
        fake_tensor.CONSTANT_NUMEL_LIMIT = numel_limit
        _GPU_NAME = gpu_name
        F.scaled_dot_product_attention = _original_sdpa
        F.dropout = _original_dropout
        torch.Tensor.masked_scatter = _original_masked_scatter
        for module, original in patched:
            module.torch_compilable_check = original
        if fake:
            masking_utils.find_packed_sequence_indices = find_packed
            masking_utils.is_tracing = tracing
        set_tracker(None)
