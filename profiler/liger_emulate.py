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
                                           "(liger_kernel/ops/fused_linear_cross_entropy.py)"}
    swaps = liger_model.swaps(setup)
    notes = [f"{names[s]}: Triton does not run on a CPU; the same saved and allocated tensors, values from torch ops"
             for s in sorted(swaps)]
    if setup.offload_checkpoints:
        notes.append("LLaMA-Factory's UnslothGradientCheckpointing (model_utils/checkpointing.py): its .to('cpu') / "
                     ".to('cuda') copies (profiler/checkpoint_offload.py), the host copies counted apart")
    return notes


# Where liger's patched modules look the Functions up (module globals bound at import)
_FUNCTION_SITES = (
    ("liger_kernel.transformers.functional", "LigerFusedLinearCrossEntropyFunction", FusedLinearCrossEntropyFunction),
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
    sites = [(sys.modules[name], attr, getattr(sys.modules[name], attr)) for name, attr, _ in _FUNCTION_SITES]
    try:
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
