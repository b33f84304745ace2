"""FlashAttention-2's varlen kernel emulated on the CPU, for traces with `--attn fa2` and neat packing.

The flash-attn package needs CUDA, so the tracer gives transformers a stand-in for it: `flash_attn_varlen_func`
with the signature of flash_attn_interface.py (v2.x), whose autograd Function allocates what `FlashAttnVarlenFunc`
and csrc/flash_attn/flash_api.cpp allocate and save, and computes the values with torch's SDPA per sequence (not
counted, as `emulate.CudaAttention` does for torch's fused kernels):
- forward (`mha_varlen_fwd`): the output (total_q, heads, dim) in the input dtype, `softmax_lse` fp32 (heads, total_q)
  and `rng_state` int64 (2); saved with q, k, v and cu_seqlens when an input needs a gradient;
- backward (`FlashAttnVarlenFunc.backward`: dq, dk, dv `empty_like`; `mha_varlen_bwd`): `softmax_d` fp32 (heads,
  total_q + 128 * batch), `dq_accum` fp32 (total_q + 128 * batch, heads, head dim rounded to 32, or 256 above 192) and
  with grouped-query attention dk/dv per query head (total_k, heads, dim), summed into dk/dv.

transformers' own code runs unchanged around it (integrations/flash_attention.py, modeling_flash_attention_utils.py:
`_lazy_imports` is pointed at the stand-in). Two host reads are answered from the batch's constant position ids,
which fake tensors cannot read: `_is_packed_sequence` (`bool` of a tensor) and the `nonzero` of
`prepare_fa_kwargs_from_position_ids`; the int32 cu_seqlens the latter returns are allocated as it allocates them,
its other temporaries (a bool and an int64 tensor of the row's length per layer, transient) are not.
The dense `flash_attn_func` (FA2 without packing) is not emulated: such a trace is refused (trace.py)."""

from __future__ import annotations

import contextlib
import math

import torch

from vlplan.planner.errors import VlplanError

from .emulate import _original_sdpa, _track, tracker_paused


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _lengths(cu_seqlens: torch.Tensor, total: int) -> list[int]:
    real = getattr(cu_seqlens, "_vlplan_values", None)
    if real is None:
        real = cu_seqlens if not _is_fake(cu_seqlens) else getattr(cu_seqlens, "constant", None)
    if real is None:
        return [total]  # values do not matter on fake tensors: one sequence
    bounds = real.tolist()
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _attention(q, k, v, lengths: list[int], scale: float, causal: bool) -> torch.Tensor:
    """Values of the varlen attention: SDPA per sequence on (1, heads, len, dim) slices, GQA expanded."""
    outs, start = [], 0
    for length in lengths:
        qs, ks, vs = (t[start:start + length].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        outs.append(_original_sdpa(qs, ks, vs, is_causal=causal, scale=scale,
                                   enable_gqa=ks.shape[1] != qs.shape[1])[0].transpose(0, 1))
        start += length
    return torch.cat(outs)


class FlashAttnVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal):
        total_q, heads, dim = q.shape
        lengths = _lengths(cu_seqlens_q, total_q)
        with tracker_paused():
            values = _attention(q, k, v, lengths, softmax_scale, causal)
            out = torch.empty(total_q, heads, v.shape[-1], dtype=q.dtype, device=q.device)
        _track(out)
        with tracker_paused():
            out.copy_(values)
            del values
        softmax_lse = torch.empty(heads, total_q, dtype=torch.float32, device=q.device)
        rng_state = torch.empty(2, dtype=torch.int64, device=q.device)
        ctx.save_for_backward(q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, rng_state)
        ctx.scale, ctx.causal, ctx.lengths = softmax_scale, causal, lengths
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, rng_state = ctx.saved_tensors
        total_q, heads, dim = q.shape
        total_k, kv_heads = k.shape[:2]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        sequences = cu_seqlens_q.shape[0] - 1
        padded = total_q + 128 * sequences
        dim_rounded = _round_up(dim, 32) if dim <= 192 else 256
        softmax_d = torch.empty(heads, padded, dtype=torch.float32, device=q.device)
        dq_accum = torch.empty(padded, heads, dim_rounded, dtype=torch.float32, device=q.device)
        expanded = []
        if kv_heads != heads:  # MQA / GQA: dk, dv per query head, then at::sum_out over each group
            expanded = [torch.empty(total_k, heads, t.shape[-1], dtype=t.dtype, device=q.device) for t in (k, v)]
        del softmax_d, dq_accum, expanded
        with tracker_paused(), torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (q, k, v)]
            values = _attention(*inputs, ctx.lengths, ctx.scale, ctx.causal)
            grads = torch.autograd.grad(values, inputs, dout)
            for target, grad in zip((dq, dk, dv), grads):
                target.copy_(grad)
            del grads, values, inputs
        return dq, dk, dv, None, None, None, None


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash_attn_interface.flash_attn_varlen_func (v2.x signature: transformers reads it to pick the kwargs)."""
    if dropout_p or softcap or alibi_slopes is not None or tuple(window_size) != (-1, -1) or return_attn_probs:
        raise VlplanError("the FlashAttention-2 emulation covers causal and bidirectional attention without "
                          "dropout, softcapping, ALiBi or a sliding window")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    # _flash_attn_varlen_forward: `maybe_contiguous` (a copy only when the last dim is strided)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return FlashAttnVarlen.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, bool(causal))


def flash_attn_func(*args, **kwargs):
    raise VlplanError("trace emulates FlashAttention-2's varlen kernel (neat packing, vision towers with cu_seqlens) "
                      "only; the dense flash_attn_func is not emulated")


@contextlib.contextmanager
def flash_attention_2(setup):
    """Within the block, transformers' flash_attention_2 runs the stand-in above (a no-op unless `--attn fa2`)."""
    if setup.attn != "fa2":
        yield
        return
    from transformers import modeling_flash_attention_utils as fa_utils

    saved = {name: getattr(fa_utils, name) for name in
             ("_lazy_imports", "_is_packed_sequence", "prepare_fa_kwargs_from_position_ids", "_loaded_implementation")}
    is_packed, prepare = saved["_is_packed_sequence"], saved["prepare_fa_kwargs_from_position_ids"]

    def lazy_imports(implementation, attention_wrapper=None, allow_all_kernels=False):
        return flash_attn_func, flash_attn_varlen_func, None, fa_utils._pad_input, fa_utils._unpad_input

    def is_packed_sequence(position_ids, batch_size):
        real = _constant(position_ids)
        if real is None:
            return False
        with _host():
            return bool(is_packed(real, batch_size))

    def prepare_from_position_ids(position_ids):
        with _host():
            (cu_q, _), (max_q, _) = prepare(_constant(position_ids))
            max_q = int(max_q)
        # the int32 cu_seqlens as transformers allocates it (torch.cat of the starts and the total)
        cu = torch.empty(cu_q.shape, dtype=torch.int32, device=position_ids.device)
        if not _is_fake(cu):
            cu.copy_(cu_q)
        else:
            cu._vlplan_values = cu_q  # the emulation reads the lengths back
        return (cu, cu), (max_q, max_q)

    # modeling_utils `_flash_attn_import_error`: the package check that the stand-in answers (the model class's own
    # `_supports_flash_attn` check still runs)
    from transformers.modeling_utils import PreTrainedModel

    import_error = PreTrainedModel.__dict__["_flash_attn_import_error"]
    PreTrainedModel._flash_attn_import_error = lambda self, *args, **kwargs: None
    fa_utils._lazy_imports = lazy_imports
    fa_utils._is_packed_sequence = is_packed_sequence
    fa_utils.prepare_fa_kwargs_from_position_ids = prepare_from_position_ids
    fa_utils._loaded_implementation = None
    try:
        yield
    finally:
        PreTrainedModel._flash_attn_import_error = import_error
        for name, value in saved.items():
            setattr(fa_utils, name, value)
        fa_utils._loaded_implementation = None


@contextlib.contextmanager
def _host():
    """Compute on real CPU tensors, uncounted: the values a host read would see."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), tracker_paused():
        yield


def _constant(t):
    if t is None:
        return None
    if not _is_fake(t):
        return t
    return getattr(t, "constant", None)
