"""LLaMA-Factory's offloaded gradient checkpointing (`use_unsloth_gc: true`) for the tracer, on the CPU.

LLaMA-Factory 0.9.5 checkpointing.py `get_unsloth_gradient_checkpointing_func` returns `UnslothGradientCheckpointing`,
an autograd Function that saves `hidden_states.to("cpu", non_blocking=True)` (host RAM) instead of the layer input,
runs the layer under `torch.no_grad()`, and in backward copies the input back (`.to("cuda")`), recomputes the layer
with grad and back-propagates through it; `torch.cuda.amp.custom_fwd` / `custom_bwd` re-enter the forward's CUDA
autocast state for the recompute. On a CPU "cpu" and "cuda" are the same device, so `OffloadedCheckpoint` is the same
Function with the two copies emulated: the host copy is made while the tracker is paused (it is not GPU memory) and
counted in `host_bytes`, the copy back is a tracked clone, and the recompute re-enters the forward's autocast through
the tracer's CUDA-autocast emulation (`cuda_autocast.autocast`).
"""

from __future__ import annotations

import contextlib

import torch

from . import cuda_autocast
from .emulate import tracker_paused


class OffloadedCheckpoint(torch.autograd.Function):
    host_bytes = 0
    host_peak_bytes = 0

    @staticmethod
    def forward(ctx, forward_function, hidden_states, *args):
        with tracker_paused():
            saved_hidden_states = hidden_states.detach().clone()  # `.to("cpu", non_blocking=True)`
        OffloadedCheckpoint._count(saved_hidden_states.numel() * saved_hidden_states.element_size())
        ctx.host_nbytes = saved_hidden_states.numel() * saved_hidden_states.element_size()
        with torch.no_grad():
            outputs = forward_function(hidden_states, *args)
        ctx.save_for_backward(saved_hidden_states)
        ctx.forward_function = forward_function
        ctx.args = args
        ctx.autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        return outputs

    @staticmethod
    def backward(ctx, grad_output):
        (hidden_states,) = ctx.saved_tensors
        hidden_states = hidden_states.clone().detach()  # `.to("cuda", non_blocking=True).detach()`
        OffloadedCheckpoint._count(-ctx.host_nbytes)  # the host copy goes with the node's saved tensors
        hidden_states.requires_grad_(True)
        with torch.enable_grad(), cuda_autocast.autocast(ctx.autocast):
            outputs = ctx.forward_function(hidden_states, *ctx.args)
            output = outputs[0] if isinstance(outputs, tuple) else outputs
        torch.autograd.backward(output, grad_output)
        return (None, hidden_states.grad) + (None,) * len(ctx.args)

    @staticmethod
    def _count(nbytes: int) -> None:
        OffloadedCheckpoint.host_bytes += nbytes
        OffloadedCheckpoint.host_peak_bytes = max(OffloadedCheckpoint.host_peak_bytes, OffloadedCheckpoint.host_bytes)

    @staticmethod
    def reset() -> None:
        OffloadedCheckpoint.host_bytes = OffloadedCheckpoint.host_peak_bytes = 0


@contextlib.contextmanager
def emulated_offload(setup):
    """Within the block, LLaMA-Factory's `get_unsloth_gradient_checkpointing_func` returns `OffloadedCheckpoint`
    (the trace of a setup with `offload_checkpoints`); a no-op otherwise."""
    if not setup.offload_checkpoints:
        yield
        return
    from .build import llamafactory_checkpointing

    checkpointing = llamafactory_checkpointing()
    original = checkpointing.get_unsloth_gradient_checkpointing_func
    checkpointing.get_unsloth_gradient_checkpointing_func = lambda: OffloadedCheckpoint.apply
    OffloadedCheckpoint.reset()
    try:
        yield
    finally:
        checkpointing.get_unsloth_gradient_checkpointing_func = original
