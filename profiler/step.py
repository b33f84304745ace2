"""The training step as the HF Trainer runs it, written once for `trace` (fake tensors on the CPU) and `profile`
(real steps on a device): the Trainer's forward (accelerate's autocast and fp32 outputs) and the step loop. Each
caller observes the steps through `StepHooks` (the tracer switches its tracker's phase; the profiler's backend closes
and opens per-phase records and times the steps)."""

from __future__ import annotations

from typing import Callable

import torch

from . import cuda_autocast


def trainer_forward(model, dtype: torch.dtype | None, autocast: Callable = cuda_autocast.autocast):
    """The forward the HF Trainer runs: accelerate wraps `model.forward` in autocast (`autocast(dtype)`: a context
    manager) and then converts the outputs' half-precision tensors to fp32 (accelerate.utils.convert_outputs_to_fp32;
    an fp32 copy of the logits). `dtype` None (fp32, pure bf16): the model as it is."""
    if dtype is None:
        return model
    from accelerate.utils import convert_outputs_to_fp32

    def autocast_forward(**inputs):
        with autocast(dtype):
            return model(**inputs)

    return convert_outputs_to_fp32(autocast_forward)


class StepHooks:
    """What a caller of `run_steps` observes; every hook does nothing unless overridden. Steps count from 1."""

    def step_start(self, step: int) -> None:
        pass

    def phase(self, name: str, step: int) -> None:
        """Called as "forward" and "backward" start in each micro-step, and as "optimizer" starts."""

    def step_end(self, step: int, optimizer) -> None:
        """After `optimizer.step()` and `zero_grad`."""


def run_steps(setup, model, optimizer, batch: dict, forward, steps: int, hooks: StepHooks) -> None:
    """`steps` optimizer steps: per step min(accumulation, 2) micro-steps of the forward and `loss.backward()` (a
    third micro-step allocates nothing the second did not), then gradient clipping (the HF Trainer clips only when
    max_grad_norm > 0), `optimizer.step()` and `zero_grad(set_to_none=True)`."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    micro_steps = min(setup.gradient_accumulation_steps, 2)
    for step in range(1, steps + 1):
        hooks.step_start(step)
        for _ in range(micro_steps):
            hooks.phase("forward", step)
            loss = forward(**batch)["loss"]
            hooks.phase("backward", step)
            loss.backward()
            del loss
        hooks.phase("optimizer", step)
        if setup.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, setup.max_grad_norm, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hooks.step_end(step, optimizer)
