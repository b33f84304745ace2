"""`vlplan plan --confirm`: the chosen micro-batch measured on the device, and the next one up shown to break the
margin, each in its own process through the sweep's isolation (`sweep.run_isolated`, the profile code).

Measured against the plan's budget (capacity x (1 - margin)): on a GPU the NVML-used peak (what nvidia-smi shows,
comparable with the estimate's `peak_bytes`); on the cpu test/dev backend, which has no device, the live-tensor peak
against the budget less the estimate's device overheads (its `peak_bytes - allocated_peak_bytes`: context, cuBLAS,
allocator reserve), with the live-tensor share of the capacity as the backend's memory limit so that a run too large
for the GPU runs out of memory as it would there.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from vlplan.planner.errors import VlplanError

CONFIRM_STEPS = 2  # the second step is the steady state (optimizer states exist)


@dataclass
class ConfirmRun:
    role: str  # "chosen" or "next"
    batch_size: int
    gradient_accumulation_steps: int
    record: dict
    compared_bytes: int | None  # the measured value held against the budget
    budget_bytes: int

    @property
    def oom(self) -> bool:
        return bool(self.record.get("oom"))

    @property
    def error(self) -> str | None:
        return self.record.get("error")

    @property
    def within_budget(self) -> bool | None:
        if self.error:
            return None
        if self.oom:
            return False
        return self.compared_bytes is not None and self.compared_bytes <= self.budget_bytes

    def to_dict(self) -> dict:
        return {"role": self.role, "micro_batch_size": self.batch_size,
                "gradient_accumulation_steps": self.gradient_accumulation_steps,
                "measured_bytes": self.compared_bytes, "budget_bytes": self.budget_bytes,
                "within_budget": self.within_budget, "oom": self.oom, "error": self.error,
                "estimate_peak_bytes": self.record.get("estimate_peak_bytes"),
                "measured_peak_bytes": self.record.get("measured_peak_bytes"),
                "measured_allocated_peak_bytes": self.record.get("measured_allocated_peak_bytes"),
                "step_time_s": self.record.get("step_time_s")}


@dataclass
class Confirmation:
    backend: str
    device: str
    measure: str  # what is compared with the budget
    runs: list[ConfirmRun] = field(default_factory=list)

    @property
    def chosen(self) -> ConfirmRun:
        return self.runs[0]

    @property
    def next_up(self) -> ConfirmRun | None:
        return self.runs[1] if len(self.runs) > 1 else None

    @property
    def confirmed(self) -> bool:
        """The chosen micro-batch stays within the budget on the device."""
        return bool(self.chosen.within_budget)

    @property
    def next_breaks(self) -> bool | None:
        """Whether the next micro-batch up breaks the margin (None: there is none, or it could not be measured)."""
        if self.next_up is None or self.next_up.within_budget is None:
            return None
        return not self.next_up.within_budget

    def to_dict(self) -> dict:
        return {"backend": self.backend, "device": self.device, "measure": self.measure,
                "confirmed": self.confirmed, "next_breaks_margin": self.next_breaks,
                "runs": [r.to_dict() for r in self.runs]}


def next_micro_batch(plan) -> int | None:
    """The next micro-batch up the planner could have chosen: the next divisor of the per-rank batch."""
    setup = plan.setup
    per_rank = setup.batch_size * setup.gradient_accumulation_steps
    larger = [d for d in range(setup.batch_size + 1, per_rank + 1) if per_rank % d == 0]
    return larger[0] if larger else None


def confirm_plan(plan, *, backend: str = "cuda", timeout_s: float = 600.0, on_event=lambda kind, data: None
                 ) -> Confirmation:
    """Profile the plan's setup and the next micro-batch up, each in a fresh process (see module docstring)."""
    from vlplan.planner.memory.estimate import estimate

    from .gpu import NoCudaError
    from .profile import ProfileOptions, check_profilable
    from .sweep import SweepConfig, run_isolated, sweep_device, terminate_as_exit

    setup = plan.setup
    if setup.zero or setup.world_size > 1:
        raise VlplanError(f"the plan uses {setup.world_size} GPU(s) with ZeRO-{setup.zero} (offload {setup.offload}): "
                          "confirmation runs one process without DeepSpeed; measure this plan with `vlplan run "
                          "--plan plan.json --max-steps 3` (its vlplan_run.json records the peaks)")
    budget = int(plan.capacity_bytes * (1 - plan.margin))
    setups = [("chosen", setup)]
    bigger = next_micro_batch(plan)
    if bigger is not None:
        per_rank = setup.batch_size * setup.gradient_accumulation_steps
        setups.append(("next", replace(setup, batch_size=bigger, gradient_accumulation_steps=per_rank // bigger)))
    limit = None
    if backend == "cpu":
        expected = estimate(setup)
        overhead = expected.peak_bytes - expected.allocated_peak_bytes
        limit = max(plan.capacity_bytes - overhead, 1)
    options = ProfileOptions(steps=CONFIRM_STEPS, backend=backend, memory_limit_bytes=limit)
    for _, candidate in setups:
        check_profilable(candidate, options)
    try:
        device = sweep_device(backend)
    except NoCudaError:
        raise VlplanError("confirmation needs a CUDA GPU (torch.cuda.is_available() is False here): the plan above "
                          "is the estimate's; run `vlplan plan ... --confirm` on the GPU machine") from None
    measure = "NVML used peak" if backend == "cuda" else "live-tensor peak + the estimate's device overheads"
    confirmation = Confirmation(backend, device, measure)
    with tempfile.TemporaryDirectory(prefix="vlplan-confirm-") as tmp, terminate_as_exit():
        for index, (role, candidate) in enumerate(setups):
            on_event("confirm", {"role": role, "batch_size": candidate.batch_size})
            config = SweepConfig(index, {"role": role}, candidate, options, timeout_s)
            record = run_isolated(config, device, Path(tmp) / role)
            compared = _compared_bytes(record, backend)
            confirmation.runs.append(ConfirmRun(role, candidate.batch_size, candidate.gradient_accumulation_steps,
                                                record, compared, budget))
    if confirmation.chosen.error:
        raise VlplanError(f"the confirmation run of micro-batch {setup.batch_size} failed: {confirmation.chosen.error}")
    return confirmation


def _compared_bytes(record: dict, backend: str) -> int | None:
    if backend == "cuda":
        return record.get("measured_peak_bytes")
    allocated = record.get("measured_allocated_peak_bytes")
    if allocated is None or record.get("estimate_peak_bytes") is None:
        return None
    return allocated + record["estimate_peak_bytes"] - record["estimate_allocated_peak_bytes"]
