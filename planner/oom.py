"""After an out-of-memory error (`vlplan run`, `vlplan profile`): the phase it hit, the estimate's term most likely
too low, the next setup. Pure: both the runner and the profiler use it.

The next setup keeps the global batch (micro-batch x accumulation x ranks): the micro-batch split by its smallest
factor with the accumulation multiplied by it, else gradient checkpointing on; `vlplan run --auto-retry` applies it.
"""

from __future__ import annotations

import re
from dataclasses import replace

from .setup import TrainSetup
from .units import GIB

# A measured peak further than this from the estimate is off: `vlplan run` warns in its record, and a measured start
# beyond it points the out-of-memory report at a model-state term
ESTIMATE_TOLERANCE = 0.10
OOM_EXIT_CODE = 3  # the exit code of `vlplan run` and `vlplan profile` after an out-of-memory error

# Breakdown terms that live for the whole run (the rest are the step's activations and temporaries)
PERSISTENT_PREFIXES = ("weights/", "adapters/", "optimizer/", "gradients/", "zero", "ddp/", "cuda/", "inputs/")


def next_setup(setup: TrainSetup) -> tuple[TrainSetup | None, str]:
    """The setup to try after an out-of-memory error, keeping the global batch: the micro-batch split by its
    smallest factor with the accumulation multiplied by it, else gradient checkpointing turned on."""
    micro = setup.batch_size
    if micro > 1:
        factor = next(f for f in range(2, micro + 1) if micro % f == 0)
        return (replace(setup, batch_size=micro // factor,
                        gradient_accumulation_steps=setup.gradient_accumulation_steps * factor),
                f"micro-batch {micro} -> {micro // factor}, accumulation {setup.gradient_accumulation_steps} -> "
                f"{setup.gradient_accumulation_steps * factor} (same global batch)")
    if not setup.gradient_checkpointing:
        return replace(setup, gradient_checkpointing=True), "gradient checkpointing on (same global batch)"
    return None, ("micro-batch 1 with gradient checkpointing is the smallest step; try `vlplan plan` with ZeRO / "
                  "offload, more GPUs, a lower --seq-len or --image-max-pixels")


def states_at_start(setup: TrainSetup) -> tuple[str, ...]:
    """The breakdown terms allocated before the first step (when `on_train_begin` measures): the weights and
    adapters; with DeepSpeed also the optimizer partitions and buffers it allocates in `deepspeed.initialize`
    (torch optimizers create their states at the first step)."""
    return ("weights/", "adapters/", "optimizer/", "gradients/", "zero") if setup.zero else ("weights/", "adapters/")


def suspect_term(setup: TrainSetup, result, phase: str, measured_start_bytes: int | None) -> tuple[str, int]:
    """The estimate's term most likely too low: the largest model-state term when the memory measured before the
    first step exceeds their estimate by more than the tolerance, else the optimizer states (optimizer step) or the
    largest activation/temporary term (forward, backward)."""
    breakdown = result.breakdown_bytes
    at_start = {k: v for k, v in breakdown.items() if k.startswith(states_at_start(setup))}
    if measured_start_bytes is not None and at_start and \
            measured_start_bytes > sum(at_start.values()) * (1 + ESTIMATE_TOLERANCE):
        name = max(at_start, key=at_start.get)
        return name, at_start[name]
    if phase == "optimizer":
        optimizer = {k: v for k, v in breakdown.items() if k.startswith("optimizer/")}
        if optimizer:
            name = max(optimizer, key=optimizer.get)
            return name, optimizer[name]
    transient = {k: v for k, v in breakdown.items() if not k.startswith(PERSISTENT_PREFIXES)} or breakdown
    name = max(transient, key=transient.get)
    return name, transient[name]


def oom_report(setup: TrainSetup, result, phase: str, error: BaseException, measured_start_bytes: int | None) -> dict:
    term, term_bytes = suspect_term(setup, result, phase, measured_start_bytes)
    follow, why = next_setup(setup)
    requested = re.search(r"Tried to allocate ([\d.]+ [GMK]iB)", str(error))
    message = (f"CUDA out of memory in the {phase} phase"
               + (f" (tried to allocate {requested.group(1)})" if requested else "")
               + f"; estimated peak {result.peak_bytes / GIB:.2f} GiB ({result.peak_phase}); the term most likely "
               f"too low: {term} ({term_bytes / GIB:.2f} GiB estimated); next: {why}")
    return {
        "message": message, "phase": phase, "error": str(error).strip().splitlines()[0] if str(error) else "",
        "estimate_peak_bytes": result.peak_bytes, "estimate_phase_allocated_bytes": result.phase_allocated_bytes,
        "suspect_term": term, "suspect_term_bytes": term_bytes,
        "measured_start_bytes": measured_start_bytes,
        "next_settings": follow.describe() if follow else None, "next": why,
    }
