"""Liger kernels (liger-kernel 0.8.5, Triton) for the tracer, on the CPU.

Triton does not run on a CPU, so the tracer applies Liger exactly as training does (LLaMA-Factory's own
`apply_liger_kernel`, llamafactory/model/model_utils/liger_kernel.py, which calls liger's
`apply_liger_kernel_to_<model_type>()` before the model is built: which swaps apply to a family is liger's and
LLaMA-Factory's code, not ours), and replaces each liger autograd Function the patched modules call with one that
computes the values with torch ops while the tracker is paused and allocates and saves exactly the tensors the Triton
implementation allocates and saves:

- `LigerFusedLinearCrossEntropyFunction` (liger_kernel/ops/fused_linear_cross_entropy.py
  `fused_linear_cross_entropy_forward`): no logits; the gradients of the hidden states (and of the head weight when
  it trains) are computed in the forward, chunk by chunk (chunk_size = next_power_of_2(ceil(BT / ceil(V / H)))), and
  saved; backward returns them (`fused_linear_cross_entropy_backward` skips its scaling when grad_output is 1).
- `LigerRMSNormFunction` (ops/rms_norm.py `rms_norm_forward` / `rms_norm_backward`): Y like X, RSTD fp32 per row,
  saves X, W, RSTD; backward writes dX into dY with `in_place` (else `zeros_like(dY)`), and for a trainable weight
  a (SMs x H) fp32 buffer summed and cast to W's dtype.
- `LigerSiLUMulFunction` (ops/swiglu.py) and `LigerGELUMulFunction` (ops/geglu.py): c like a, saves a and b;
  backward writes the gradients into a and b and returns them.
- `LigerLayerNormFunction` (ops/layer_norm.py; `liger_kernel.functional.layer_norm` dispatches to it, the
  nvidia-triton implementation, on a plain install): Y like X, Mean and RSTD fp32, saves X, W, B, Mean, RSTD;
  backward DX like X and a (SMs x H) fp32 buffer per trainable weight/bias, summed and cast.

- `LigerRopeFunction` (ops/rope.py `rope_forward` / `rope_backward`): q and k transposed to (batch, seq, heads,
  dim) and `.contiguous()` (a copy only where that layout is not contiguous), rotated in place, returned transposed;
  saves cos and sin. Reached through liger's op dispatcher (ops/backends/_triton/rope.py `rope_triton`), whose
  backend discovery the tracer runs before the forward.

The SM count those backward buffers use is the setup GPU's (planner/memory/liger.py `sm_count`).

liger 0.8.5's Qwen2-VL/2.5-VL forwards (liger_kernel/transformers/model/qwen2_vl.py, qwen2_5_vl.py) do not import
against transformers 5.23 (planner/memory/liger.py `import_failure`), so LLaMA-Factory's load fails there. To trace
the patch as it applies where it imports, the tracer puts a port of their `lce_forward` (`_qwen_lce_forward`, the
same code less the output class that no longer exists) in their place in `sys.modules` for the block; liger's own
`apply_liger_kernel_to_qwen2(_5)_vl` then runs unchanged and does every other swap itself.

The trace output lists the emulated kernels (`emulated_kernels`). Everything is restored on exit: liger's patches
rebind module globals and class attributes of transformers' modeling modules.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types

import torch

from vlplan.planner.errors import VlplanError
from vlplan.planner.memory import liger as liger_model

from .emulate import tracker_paused


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """liger_kernel/ops/fused_linear_cross_entropy.py `LigerFusedLinearCrossEntropyFunction` with its defaults
    (mean/sum reduction, no bias, no ce_weight, no z-loss, accum_dtype None), as `LigerForCausalLMLoss` calls it."""

    @staticmethod
    def forward(ctx, _input, weight, target, bias=None, ce_weight=None, ignore_index=-100, lse_square_scale=0.0,
                label_smoothing=0.0, reduction="mean", softcap=None, return_z_loss=False, accum_dtype=None,
                use_token_scaling=False, return_token_accuracy=False, return_predicted_tokens=False, ce_impl=None,
                ce_mode=None, chunk_mem_const=1):
        if (bias is not None or ce_weight is not None or return_z_loss or use_token_scaling or reduction == "none"
                or return_token_accuracy or return_predicted_tokens or softcap is not None):
            raise VlplanError("the Liger fused cross-entropy emulation covers the causal-LM loss only (no bias, class "
                              "weights, z-loss, token scaling, soft-capping or per-token reduction)")
        device = _input.device
        BT, H = _input.shape
        V = weight.shape[0]
        chunk_size = liger_model.chunk_size(BT, H, V, chunk_mem_const)
        num_chunks = -(-BT // chunk_size)
        input_requires_grad = _input.requires_grad
        weight_needs_grad = weight.requires_grad
        grad_input = torch.zeros_like(_input)
        grad_weight = None
        if input_requires_grad and weight_needs_grad:
            grad_weight = torch.zeros_like(weight) if accum_dtype is None else torch.zeros_like(weight,
                                                                                               dtype=accum_dtype)
        loss_1d = torch.zeros(BT, dtype=torch.float32, device=device)
        target_mask = target != ignore_index
        count = target_mask.sum()  # `.item()` on the host
        del count
        autocast = torch.is_autocast_enabled("cpu")
        compute = torch.get_autocast_dtype("cpu") if autocast else None
        # `_can_use_mm_out`: on CUDA with grad disabled (inside forward), operands of one dtype that is the autocast
        # dtype (or no autocast): logits and dX go into preallocated buffers with `out=`
        use_mm_out = _input.dtype == weight.dtype and (compute is None or _input.dtype == compute)
        logits_storage = torch.empty((chunk_size, V), dtype=_input.dtype, device=device) if use_mm_out else None
        for chunk_id in range(num_chunks):
            start, end = chunk_id * chunk_size, min((chunk_id + 1) * chunk_size, BT)
            _input_chunk = _input[start:end]
            if logits_storage is not None:
                logits_chunk = logits_storage[: end - start]
                with tracker_paused():
                    logits_chunk.copy_(_input_chunk @ weight.t())
            else:
                logits_chunk = _input_chunk @ weight.t()  # autocast casts (the weight through its cache)
            target_chunk = target[start:end]
            with tracker_paused(), torch.no_grad():  # liger_cross_entropy_kernel: loss, and dlogits in place
                logp = torch.log_softmax(logits_chunk.float(), -1)
                valid = target_chunk != ignore_index
                picked = logp.gather(-1, target_chunk.clamp(min=0)[:, None])[:, 0]
                loss_1d[start:end].copy_(torch.where(valid, -picked, torch.zeros_like(picked)))
                probs = logp.exp()
                probs[torch.arange(end - start), target_chunk.clamp(min=0)] -= 1.0
                probs = probs * valid[:, None] / target_mask.sum().clamp(min=1)
                logits_chunk.copy_(probs.to(logits_chunk.dtype))
            grad_logits_chunk = logits_chunk
            del logits_chunk
            if input_requires_grad:
                if use_mm_out and grad_logits_chunk.dtype == grad_input.dtype:
                    with tracker_paused():
                        grad_input[start:end].copy_(grad_logits_chunk @ weight)
                else:
                    grad_input[start:end] = grad_logits_chunk @ weight
            if grad_weight is not None and input_requires_grad:
                grad_logits_t = grad_logits_chunk.t()
                if grad_weight.dtype == torch.float32 and grad_logits_t.dtype in (torch.float16, torch.bfloat16):
                    # addmm(out_dtype=fp32, out=grad_weight) on sm_80+; the input chunk aligned to the gradient's
                    # dtype first
                    input_chunk = _input_chunk.to(grad_logits_t.dtype)
                    with tracker_paused():
                        grad_weight.add_((grad_logits_t @ input_chunk).float())
                    del input_chunk
                elif grad_weight.dtype == grad_logits_t.dtype and grad_logits_t.dtype in (torch.float16,
                                                                                          torch.bfloat16):
                    input_chunk = _input_chunk.to(grad_logits_t.dtype)
                    with tracker_paused():
                        grad_weight.add_(grad_logits_t @ input_chunk)
                    del input_chunk
                else:  # the legacy fallback: a parameter-sized fp32 product per chunk
                    grad_weight += torch.mm(grad_logits_chunk.t(), _input_chunk).float()
                del grad_logits_t
            del grad_logits_chunk, _input_chunk, target_chunk
        del logits_storage
        loss = torch.sum(loss_1d) if reduction == "mean" else torch.sum(loss_1d)
        del loss_1d, target_mask
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_input.detach(), grad_weight.detach() if grad_weight is not None else None)
        return loss, None, None, None

    @staticmethod
    def backward(ctx, grad_output, *_):
        grad_input, grad_weight = ctx.saved_tensors
        # fused_linear_cross_entropy_backward: `torch.equal(grad_output, torch.tensor(1.0))`; the trace's backward
        # starts at this loss, so grad_output is 1.0 and nothing is scaled
        one = torch.tensor(1.0, device=grad_output.device)
        del one
        gradients = (grad_input, grad_weight) + (None,) * 16
        return gradients[: len(ctx.needs_input_grad)]


_SM_COUNT = [132]  # the setup GPU's SM count while `liger_kernels` is active


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


class RMSNormFunction(torch.autograd.Function):
    """liger_kernel/ops/rms_norm.py `LigerRMSNormFunction` (`@ensure_contiguous`; `rms_norm_forward`,
    `rms_norm_backward`)."""

    @staticmethod
    def forward(ctx, X, W, eps, offset=0.0, casting_mode="llama", in_place=True, row_mode=None):
        X = X.contiguous()
        Y = torch.empty_like(X)
        RSTD = torch.empty(_rows(X), dtype=torch.float32, device=X.device)  # llama / gemma casting: fp32
        with tracker_paused(), torch.no_grad():
            x32 = X.float()
            rstd = torch.rsqrt(x32.pow(2).mean(-1) + eps)
            RSTD.copy_(rstd.reshape(-1))
            w = W.float() + offset if W is not None else 1.0
            if casting_mode == "llama":
                Y.copy_((x32 * rstd[..., None]).to(X.dtype) * w)
            else:
                Y.copy_(x32 * rstd[..., None] * w)
        ctx.offset, ctx.in_place, ctx.eps = offset, in_place, eps
        ctx.elementwise_affine = W is not None
        if W is not None:
            ctx.save_for_backward(X, W, RSTD)
        else:
            ctx.save_for_backward(X, RSTD)
        return Y

    @staticmethod
    def backward(ctx, dY):
        if ctx.elementwise_affine:
            X, W, RSTD = ctx.saved_tensors
        else:
            (X, RSTD), W = ctx.saved_tensors, None
        dY = dY.contiguous()
        needs_dw = ctx.needs_input_grad[1] if ctx.elementwise_affine else False
        _dW = torch.empty((_SM_COUNT[0], X.shape[-1]), dtype=torch.float32, device=X.device) if needs_dw else None
        dX = dY if ctx.in_place else torch.zeros_like(dY)
        with tracker_paused(), torch.no_grad():
            x32, dy32 = X.float(), dY.float()
            rstd = RSTD.reshape(X.shape[:-1])[..., None]
            w = W.float() + ctx.offset if W is not None else torch.ones((), device=X.device)
            xhat = x32 * rstd
            m = dy32 * w
            dx = rstd * (m - xhat * (m * xhat).mean(-1, keepdim=True))
            if needs_dw:
                _dW.zero_()
                _dW[0].copy_((dy32 * xhat).reshape(-1, X.shape[-1]).sum(0))
            dX.copy_(dx.to(dX.dtype))
        dW = _dW.sum(dim=0).to(W.dtype) if needs_dw else None
        return dX, dW, None, None, None, None, None


class _GatedProductFunction(torch.autograd.Function):
    """`c = torch.empty_like(a)`, saves a and b; backward writes da, db into a, b and returns them. Each subclass
    sets `activation` (SiLU for SwiGLU, tanh GELU for GEGLU)."""

    activation: staticmethod

    @classmethod
    def _forward(cls, ctx, a, b):
        a, b = a.contiguous(), b.contiguous()
        c = torch.empty_like(a)
        with tracker_paused(), torch.no_grad():
            c.copy_(cls.activation(a.float()) * b.float())
        ctx.save_for_backward(a, b)
        return c

    @classmethod
    def _backward(cls, ctx, dc):
        a, b = ctx.saved_tensors
        dc = dc.contiguous()
        with tracker_paused(), torch.enable_grad():
            a32 = a.detach().float().requires_grad_(True)
            act = cls.activation(a32)
            (dact,) = torch.autograd.grad(act, a32, dc.float())
            db = act.detach() * dc.float()
            da = dact * b.float()
        with tracker_paused(), torch.no_grad():  # in place into the saved inputs (the Triton kernel's stores)
            a.copy_(da.to(a.dtype))
            b.copy_(db.to(b.dtype))
        return a, b


class SiLUMulFunction(_GatedProductFunction):
    """liger_kernel/ops/swiglu.py `LigerSiLUMulFunction` (`swiglu_forward` / `swiglu_backward`), multipliers 1."""

    activation = staticmethod(torch.nn.functional.silu)

    @staticmethod
    def forward(ctx, a, b, gate_multiplier=1.0, down_multiplier=1.0):
        if float(gate_multiplier) != 1.0 or float(down_multiplier) != 1.0:
            raise VlplanError("the Liger SwiGLU emulation covers gate and down multipliers of 1 only")
        return SiLUMulFunction._forward(ctx, a, b)

    @staticmethod
    def backward(ctx, dc):
        return SiLUMulFunction._backward(ctx, dc) + (None, None)


class GELUMulFunction(_GatedProductFunction):
    """liger_kernel/ops/geglu.py `LigerGELUMulFunction` (`geglu_forward` / `geglu_backward`, tanh GELU)."""

    activation = staticmethod(lambda x: torch.nn.functional.gelu(x, approximate="tanh"))

    @staticmethod
    def forward(ctx, a, b):
        return GELUMulFunction._forward(ctx, a, b)

    @staticmethod
    def backward(ctx, dc):
        return GELUMulFunction._backward(ctx, dc)


class LayerNormFunction(torch.autograd.Function):
    """liger_kernel/ops/layer_norm.py `LigerLayerNormFunction` (`@ensure_contiguous`; `layer_norm_forward`,
    `layer_norm_backward`)."""

    @staticmethod
    def forward(ctx, X, W, B, eps):
        X = X.contiguous()
        Y = torch.empty_like(X)
        Mean = torch.empty(_rows(X), dtype=torch.float32, device=X.device)
        RSTD = torch.empty(_rows(X), dtype=torch.float32, device=X.device)
        with tracker_paused(), torch.no_grad():
            x32 = X.float()
            mean = x32.mean(-1)
            rstd = torch.rsqrt(x32.var(-1, unbiased=False) + eps)
            Mean.copy_(mean.reshape(-1))
            RSTD.copy_(rstd.reshape(-1))
            Y.copy_((x32 - mean[..., None]) * rstd[..., None] * W.float() + B.float())
        ctx.save_for_backward(X, W, B, Mean, RSTD)
        return Y

    @staticmethod
    def backward(ctx, dY):
        X, W, B, Mean, RSTD = ctx.saved_tensors
        dY = dY.contiguous()
        needs_dw, needs_db = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        H = X.shape[-1]
        _DW = torch.empty((_SM_COUNT[0], H), dtype=torch.float32, device=W.device) if needs_dw else None
        _DB = torch.empty((_SM_COUNT[0], H), dtype=torch.float32, device=W.device) if needs_db else None
        DX = torch.empty(X.shape, dtype=X.dtype, device=X.device)
        with tracker_paused(), torch.no_grad():
            x32, dy32 = X.float(), dY.float()
            xhat = (x32 - Mean.reshape(X.shape[:-1])[..., None]) * RSTD.reshape(X.shape[:-1])[..., None]
            wdy = dy32 * W.float()
            c1 = (xhat * wdy).mean(-1, keepdim=True)
            c2 = wdy.mean(-1, keepdim=True)
            DX.copy_(((wdy - (xhat * c1 + c2)) * RSTD.reshape(X.shape[:-1])[..., None]).to(X.dtype))
            if needs_dw:
                _DW.zero_()
                _DW[0].copy_((dy32 * xhat).reshape(-1, H).sum(0))
            if needs_db:
                _DB.zero_()
                _DB[0].copy_(dy32.reshape(-1, H).sum(0))
        DW = _DW.sum(dim=0).to(W.dtype) if needs_dw else None
        DB = _DB.sum(dim=0).to(B.dtype) if needs_db else None
        return DX, DW, DB, None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_forward's cos/sin handling: 4-D tables squeezed, 2-D ones unsqueezed to (1, seq, dim); views only."""
    if cos.ndim == 4:
        cos, sin = cos.squeeze(1), sin.squeeze(1)
    if cos.ndim == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    return cos, sin


class RopeFunction(torch.autograd.Function):
    """liger_kernel/ops/rope.py `LigerRopeFunction` (`rope_forward` / `rope_backward`, full rotary width): q and k
    are transposed back to their physical (batch, seq, heads, dim) layout and made `.contiguous()` (a copy only where
    that layout is not already contiguous, e.g. after Gemma 3's q_norm/k_norm), rotated in place by the kernel and
    returned transposed; cos and sin (`.contiguous()`, no copy for transformers' tables) are saved. Backward does the
    same to dq and dk."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids=None, unsqueeze_dim=1, rotary_dim=None):
        if rotary_dim is not None and rotary_dim != q.shape[-1]:
            raise VlplanError("the Liger RoPE emulation covers a full rotary width only")
        cos, sin = _rope_tables(cos, sin)
        q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()
        with tracker_paused(), torch.no_grad():
            c, s_ = cos[:, :, None, :], sin[:, :, None, :]
            for x in (q, k):
                x.copy_(x * c + _rotate_half(x) * s_)
        ctx.save_for_backward(cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = dq.transpose(1, 2).contiguous(), dk.transpose(1, 2).contiguous()
        with tracker_paused(), torch.no_grad():
            c, s_ = cos[:, :, None, :], sin[:, :, None, :]
            for x in (dq, dk):
                x.copy_(x * c - _rotate_half(x) * s_)
        return dq.transpose(1, 2), dk.transpose(1, 2), None, None, None, None, None


def _functional_layer_norm(x, weight, bias=None, eps=1e-6, *, impl=None, mode=None, backend=None):
    """liger_kernel/functional.py `layer_norm` as it dispatches on a plain install (ops/backends/_triton/
    layer_norm.py `layer_norm_triton`: `LigerLayerNormFunction.apply`)."""
    if bias is None:
        bias = torch.zeros_like(weight)
    return LayerNormFunction.apply(x, weight, bias, eps)


def _qwen_lce_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                      inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                      output_hidden_states=None, return_dict=None, pixel_values=None, pixel_values_videos=None,
                      image_grid_thw=None, video_grid_thw=None, rope_deltas=None, mm_token_type_ids=None,
                      cache_position=None, second_per_grid_ts=None, skip_logits=None, **kwargs):
    """liger_kernel/transformers/model/qwen2_5_vl.py (and qwen2_vl.py) `lce_forward`, ported: the same calls in the
    same order; the output is transformers' `CausalLMOutputWithPast` (liger's subclass of the gone
    `Qwen2_5_VLCausalLMOutputWithPast` carries rope_deltas, which 5.23's model output no longer has, and
    token_accuracy, None here)."""
    from liger_kernel.transformers.model.loss_utils import unpack_cross_entropy_result
    from transformers.modeling_outputs import CausalLMOutputWithPast

    module = sys.modules[type(self).__module__]
    output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
    output_hidden_states = (output_hidden_states if output_hidden_states is not None
                            else self.config.output_hidden_states)
    return_dict = return_dict if return_dict is not None else self.config.use_return_dict
    extra = {"second_per_grid_ts": second_per_grid_ts} if "qwen2_5_vl" in module.__name__ else {}
    outputs = self.model(input_ids=input_ids, pixel_values=pixel_values, pixel_values_videos=pixel_values_videos,
                         image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw, **extra,
                         position_ids=position_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
                         output_hidden_states=output_hidden_states, return_dict=return_dict,
                         mm_token_type_ids=mm_token_type_ids, cache_position=cache_position, **kwargs)
    hidden_states = outputs[0]
    shift_labels = kwargs.pop("shift_labels", None)
    loss = logits = None
    if skip_logits is None:
        skip_logits = self.training and (labels is not None or shift_labels is not None)
    if skip_logits:
        result = _port_loss_function()(hidden_states=hidden_states, lm_head_weight=self.lm_head.weight, labels=labels,
                                       shift_labels=shift_labels, hidden_size=self.config.text_config.hidden_size,
                                       **kwargs)
        loss, _, _, _ = unpack_cross_entropy_result(result)
    else:
        logits = self.lm_head(hidden_states)
        if labels is not None or shift_labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, shift_labels=shift_labels,
                                      vocab_size=self.config.text_config.vocab_size)
    if not return_dict:
        output = (logits,) + outputs[1:]
        return (loss,) + output if loss is not None else output
    return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


_PORT_MODULES = ("liger_kernel.transformers.model.qwen2_vl", "liger_kernel.transformers.model.qwen2_5_vl")


def _port_loss_function():
    """The port module's `LigerForCausalLMLoss` (wrapped for the loss phase like liger's own modules')."""
    return sys.modules[_PORT_MODULES[1]].LigerForCausalLMLoss


def _port_modules() -> list:
    """Module objects standing in for liger's Qwen forward modules that fail to import: `lce_forward` is the port,
    `LigerForCausalLMLoss` liger's own (liger_kernel/transformers/model/loss_utils.py)."""
    from liger_kernel.transformers.model.loss_utils import LigerForCausalLMLoss

    out = []
    for name in _PORT_MODULES:
        module = types.ModuleType(name, "vlplan's port of liger's Qwen lce_forward (profiler/liger_emulate.py)")
        module.lce_forward = _qwen_lce_forward
        module.LigerForCausalLMLoss = LigerForCausalLMLoss
        out.append((name, module))
    return out


def _in_loss_phase(loss_function):
    def run(*args, **kwargs):
        from . import emulate

        if emulate._ACTIVE_TRACKER is not None:
            emulate._ACTIVE_TRACKER.phase = "loss"
        return loss_function(*args, **kwargs)

    return run


def emulated_kernels(setup) -> list[str]:
    """What the trace of `setup` ran as CPU emulations of Liger's Triton kernels, for its output."""
    names = {"fused_linear_cross_entropy": "LigerFusedLinearCrossEntropyFunction "
                                           "(liger_kernel/ops/fused_linear_cross_entropy.py)",
             "rms_norm": "LigerRMSNormFunction (liger_kernel/ops/rms_norm.py)",
             "swiglu": "LigerSiLUMulFunction (liger_kernel/ops/swiglu.py)",
             "geglu": "LigerGELUMulFunction (liger_kernel/ops/geglu.py)",
             "layer_norm": "LigerLayerNormFunction (liger_kernel/ops/layer_norm.py)",
             "rope": "LigerRopeFunction (liger_kernel/ops/rope.py)"}
    swaps = liger_model.swaps(setup)
    notes = [f"{names[s]}: Triton does not run on a CPU; the same saved and allocated tensors, values from torch ops"
             for s in sorted(swaps)]
    if liger_model.import_failure(setup):
        notes.append("liger_kernel/transformers/model/{qwen2_vl,qwen2_5_vl}.py `lce_forward`: ported "
                     "(profiler/liger_emulate.py `_qwen_lce_forward`), as liger 0.8.5's does not import against "
                     "transformers 5.23 (LLaMA-Factory's load fails there)")
    if setup.offload_checkpoints:
        notes.append("LLaMA-Factory's UnslothGradientCheckpointing (model_utils/checkpointing.py): its .to('cpu') / "
                     ".to('cuda') copies (profiler/checkpoint_offload.py), the host copies counted apart")
    return notes


# Where liger's patched modules look the Functions up (module globals bound at import)
_FUNCTION_SITES = (
    ("liger_kernel.transformers.functional", "LigerFusedLinearCrossEntropyFunction", FusedLinearCrossEntropyFunction),
    ("liger_kernel.transformers.rms_norm", "LigerRMSNormFunction", RMSNormFunction),
    ("liger_kernel.transformers.swiglu", "LigerSiLUMulFunction", SiLUMulFunction),
    ("liger_kernel.transformers.geglu", "LigerGELUMulFunction", GELUMulFunction),
    ("liger_kernel.transformers.layer_norm", "_functional_layer_norm", _functional_layer_norm),
    ("liger_kernel.ops.backends._triton.rope", "LigerRopeFunction", RopeFunction),
)


@contextlib.contextmanager
def liger_kernels(setup, model_type: str):
    """Within the block, models built for `setup` have Liger's kernels applied as LLaMA-Factory applies them
    (`enable_liger_kernel: true`), with the Functions emulated; a no-op when the setup does not enable Liger."""
    if not setup.liger_kernel or not liger_model.modelled(setup):
        # not modelled: traced without Liger, like the estimate (an upper bound; `setup_warnings` says so)
        yield
        return
    try:
        importlib.import_module("liger_kernel.transformers.monkey_patch")
    except ImportError as err:
        raise VlplanError(f"tracing --liger-kernel runs liger-kernel's own patches: {err} (pip install --no-deps "
                          "liger-kernel==0.8.5 triton)") from None
    from .build import llamafactory_checkpointing

    llamafactory_checkpointing()  # imports the llamafactory.model package (see there)
    from llamafactory.model.model_utils.liger_kernel import apply_liger_kernel

    saved = _snapshot(model_type)
    for name, _, _ in _FUNCTION_SITES:
        importlib.import_module(name)
    # liger's op registry imports the backends of a dispatched op (rope) at its first call and logs each that fails
    # (CuTe DSL, Ascend) with the ImportError as an argument; inside the traced forward that error's traceback would
    # keep the forward's frames, and their tensors, alive wherever log records are kept (pytest's log capture)
    discover = getattr(importlib.import_module("liger_kernel.backends.registry"), "_discover", None)
    if discover is not None:
        discover("rope")
    sites = [(sys.modules[name], attr, getattr(sys.modules[name], attr)) for name, attr, _ in _FUNCTION_SITES]
    # liger's mllama/gemma3/paligemma patches rebind `nn.LayerNorm` on torch.nn itself
    sites.append((torch.nn, "LayerNorm", torch.nn.LayerNorm))
    ports = _port_modules() if liger_model.import_failure(setup) else []
    previous_sm = _SM_COUNT[0]
    _SM_COUNT[0] = liger_model.sm_count(setup.gpu.name)
    try:
        for name, module in ports:
            sys.modules[name] = module
        for (module, attr, _), (_, _, emulated) in zip(sites, _FUNCTION_SITES):
            setattr(module, attr, emulated)
        apply_liger_kernel(types.SimpleNamespace(model_type=model_type),
                           types.SimpleNamespace(enable_liger_kernel=True), is_trainable=True, require_logits=False)
        # the loss phase starts where the fused loss does (the tracer's lm_head hook never fires: no lm_head call)
        for name, module in list(sys.modules.items()):
            if name.startswith("liger_kernel.transformers.model.") and hasattr(module, "LigerForCausalLMLoss"):
                sites.append((module, "LigerForCausalLMLoss", module.LigerForCausalLMLoss))
                module.LigerForCausalLMLoss = _in_loss_phase(module.LigerForCausalLMLoss)
        yield
    finally:
        for module, attr, original in sites:
            setattr(module, attr, original)
        for name, module in ports:
            if sys.modules.get(name) is module:
                del sys.modules[name]
        _SM_COUNT[0] = previous_sm
        _restore(saved)


def _snapshot(model_type: str) -> list:
    """The globals of the model type's modeling module and the `forward` of its classes, which liger rebinds."""
    name = f"transformers.models.{model_type}.modeling_{model_type}"
    try:
        module = importlib.import_module(name)
    except ImportError:  # remote-code families (MiniCPM-V): LLaMA-Factory patches nothing there
        return []
    classes = [c for c in vars(module).values() if isinstance(c, type) and c.__module__ == name]
    return [(module, dict(vars(module)), [(c, c.__dict__.get("forward")) for c in classes])]


def _restore(saved: list) -> None:
    for module, globals_, forwards in saved:
        for key in [k for k in vars(module) if k not in globals_]:
            delattr(module, key)
        for key, value in globals_.items():
            if getattr(module, key, None) is not value:
                setattr(module, key, value)
        for cls, forward in forwards:
            if cls.__dict__.get("forward") is not forward:
                if forward is None:
                    delattr(cls, "forward")
                else:
                    cls.forward = forward
