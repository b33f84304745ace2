"""One training step on symbolic tensors: inputs, vision tower, projector, language model, loss, backward,
gradient clipping and the optimizer step, as the HF Trainer (with accelerate) runs them.

`simulate(setup)` returns the peak of each phase with the live bytes per category at that peak, exactly the
quantities the tracer measures on the real modeling code.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

from ..errors import VlplanError
from ..modules import LANGUAGE, VISION
from ..setup import Train, TrainSetup
from . import ops
from .families import model_for
from .sim import Engine, T

PHASES = ("forward", "loss", "backward", "optimizer")


@dataclass
class SimResult:
    phase_peaks: dict[str, int]
    phase_breakdown: dict[str, dict[str, int]]
    params_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def peak_phase(self) -> str:
        return max(self.phase_peaks, key=self.phase_peaks.get)


# The step ---------------------------------------------------------------------------------------------------------


def simulate(setup: TrainSetup, counts: dict[str, int] | None = None, detail: bool = False) -> SimResult:
    family = setup.model.family
    builder = model_for(family)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the simulation frees by reference counting alone, as deterministically as torch does
    try:
        return _simulate(builder, setup, counts, detail)
    finally:
        if gc_was_enabled:
            gc.enable()


def _simulate(builder, setup: TrainSetup, counts, detail: bool) -> SimResult:
    e = Engine(detail)
    e.reduce_grads = bool(setup.zero)
    model = builder(e, setup, counts)
    # DeepSpeed keeps its own partitioned states (zero.py); the simulation holds the single-GPU torch ones
    states = [] if setup.zero else _optimizer_states(e, setup, model)
    inputs = model.inputs(e)
    micro_steps = min(setup.gradient_accumulation_steps, 2)
    for _ in range(micro_steps):
        e.set_phase("forward")
        loss = model.forward(e, inputs)
        e.backward(loss)
        del loss
    e.set_phase("optimizer")
    e.scope = "optimizer"
    if not setup.zero:
        _optimizer_step(e, setup, model)
    else:
        e.new(1, "fp32", name="ds_step")  # the optimizer phase exists; DeepSpeed's own step works in place
    del states
    peaks = {phase: e.phase_peaks[phase][0] for phase in PHASES if phase in e.phase_peaks}
    breakdown = {phase: {k: v for k, v in e.phase_peaks[phase][1].items() if v} for phase in peaks}
    result = SimResult(peaks, breakdown)
    result.blocks = e.phase_blocks
    result.segment_peaks = dict(e.segment_peaks)
    result.segment_blocks = e.segment_blocks
    return result


def _trainable(model) -> list:
    return [p for p in model.e.params if p.trainable]


def _optimizer_states(e: Engine, setup: TrainSetup, model) -> list[T]:
    """Persistent optimizer state (steady state: created at the first step and kept).

    torch AdamW (optim/adam.py `_init_group`): exp_avg and exp_avg_sq in the parameter's dtype, plus a `step`
    counter per parameter that lives on the device for fused/capturable (a 0-d fp32 tensor: one 512-byte block).
    """
    states = []
    for p in _trainable(model):
        if setup.optimizer in ("adamw", "adamw-foreach"):
            for state in ("exp_avg", "exp_avg_sq"):
                states.append(e.new(p.numel, p.dtype, name=f"{state}:{p.name}", category="optimizer/adam_states"))
            if setup.optimizer == "adamw":
                states.append(e.new(1, "fp32", name=f"step:{p.name}", category="optimizer/step_counters"))
        elif setup.optimizer == "sgd":
            pass
        else:
            raise VlplanError(f"no optimizer-state model for {setup.optimizer!r} yet")
    return states


def _optimizer_step(e: Engine, setup: TrainSetup, model) -> None:
    """clip_grad_norm_ (foreach: one 0-d norm per gradient, stacked), optimizer.step, zero_grad(set_to_none)."""
    trainable = [p for p in _trainable(model) if p.grad is not None]
    norms = [e.new(1, "fp32", name="grad_norm") for _ in trainable]
    stacked = e.new(len(norms), "fp32", name="stack")
    total = e.new(1, "fp32", name="total_norm")
    del norms, stacked
    coef = e.new(1, "fp32", name="clip_coef")
    clamped = e.new(1, "fp32", name="clip_coef_clamped")
    del coef, clamped, total
    if setup.optimizer == "adamw-foreach":
        # _multi_tensor_adam: exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs), per parameter group
        for group in _param_groups(trainable):
            temp = [e.new(p.numel, p.dtype, name="exp_avg_sq_sqrt") for p in group]
            del temp
    for p in trainable:
        p.grad = None


def _param_groups(params: list) -> list[list]:
    """Trainer.create_optimizer: weight-decay params (not bias/norm) and the rest, in two groups."""
    decay = [p for p in params if not (p.name.endswith(".bias") or "norm" in p.name)]
    rest = [p for p in params if p not in decay]
    return [g for g in (decay, rest) if g]


