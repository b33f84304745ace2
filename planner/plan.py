"""`plan(setup, global_batch_size=...)`: the launch settings for a GPU budget.

Searches micro-batch, gradient accumulation, gradient checkpointing, ZeRO stage and CPU offload (and the attention
kernel among those allowed), keeping micro-batch x accumulation x data-parallel ranks = the global batch exactly,
keeping the estimated `peak_bytes` within capacity x (1 - margin) and the host RAM each node needs (its processes and
what ZeRO offloads to the CPU, `cpu_ram_bytes`) within the host RAM budget, and picks the fastest by the FLOPs model of
`throughput.py`. Every choice carries its reason; when nothing fits, `NothingFits` says why and what would.

The host RAM budget is the caller's (`host_ram_bytes`, the CLI's `--host-ram-gib` or this machine's RAM) or else the
stated assumption for the GPU type (`hardware.assumed_host_ram`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

from .errors import VlplanError
from .hardware import assumed_host_ram
from .memory.estimate import Estimate, estimate, peak_floor_bytes
from .memory.estimate import host_ram_bytes as estimated_host_ram_bytes
from .memory.families import model_for
from .setup import TrainSetup
from .throughput import StepTime, step_time
from .units import GIB

# The largest global batch `plan` searches (2**20 samples per optimizer step; fine-tuning runs use tens to thousands):
# beyond it the search would enumerate divisors of an absurd number for no useful answer
MAX_GLOBAL_BATCH_SIZE = 2**20


class NothingFits(VlplanError):
    """No setting fits the GPUs; the message lists what would."""


@dataclass
class Candidate:
    setup: TrainSetup
    estimate: Estimate
    time: StepTime

    def summary(self) -> dict:
        s = self.setup
        return {"micro_batch_size": s.batch_size, "gradient_accumulation_steps": s.gradient_accumulation_steps,
                "zero_stage": s.zero, "offload": s.offload, "gradient_checkpointing": s.gradient_checkpointing,
                "attn": s.attn, "peak_bytes": self.estimate.peak_bytes, "host_ram_bytes": self.estimate.cpu_ram_bytes,
                "step_time_s": self.time.seconds, **_fsdp_fields(s)}


@dataclass
class Plan:
    chosen: Candidate
    global_batch_size: int
    requested_global_batch_size: int
    margin: float
    capacity_bytes: int
    reasons: list[str]
    alternatives: list[Candidate]
    num_samples: int | None = None
    epochs: float = 1.0
    explored: int = 0
    assumptions: dict = field(default_factory=dict)
    host_ram_budget_bytes: int = 0  # per node
    host_ram_source: str = ""  # where the budget comes from
    host_ram_assumed: bool = False  # the GPU type's assumption, not the caller's number
    levers: list[str] = field(default_factory=list)  # memory levers the plan switched on to fit (`memory_levers`)

    @property
    def setup(self) -> TrainSetup:
        return self.chosen.setup

    @property
    def step_time_s(self) -> float:
        return self.chosen.time.seconds

    @property
    def epoch_time_s(self) -> float | None:
        if not self.num_samples:
            return None
        return self.num_samples / self.global_batch_size * self.step_time_s

    def to_dict(self) -> dict:
        s = self.setup
        epoch = self.epoch_time_s
        gpu_hours = epoch * self.epochs * s.world_size / 3600 if epoch is not None else None
        return {
            "micro_batch_size": s.batch_size, "gradient_accumulation_steps": s.gradient_accumulation_steps,
            "num_gpus": s.num_gpus, "num_nodes": s.num_nodes, "global_batch_size": self.global_batch_size,
            "requested_global_batch_size": self.requested_global_batch_size, **_fsdp_fields(s), "zero_stage": s.zero,
            "offload": s.offload, "gradient_checkpointing": s.gradient_checkpointing, "attn": s.attn,
            "settings": s.describe(), "estimate": self.chosen.estimate.to_dict(), "step_time_s": self.step_time_s,
            "step_time_breakdown_s": self.chosen.time.parts, "mfu": self.chosen.time.mfu,
            "epoch_time_s": epoch, "gpu_hours": gpu_hours, "num_samples": self.num_samples, "epochs": self.epochs,
            "margin": self.margin, "capacity_bytes": self.capacity_bytes,
            "budget_bytes": int(self.capacity_bytes * (1 - self.margin)),
            "host_ram_bytes": self.chosen.estimate.cpu_ram_bytes,
            "host_ram_budget_bytes": self.host_ram_budget_bytes, "host_ram_source": self.host_ram_source,
            "host_ram_assumed": self.host_ram_assumed,
            "reasons": self.reasons,
            "alternatives": [c.summary() for c in self.alternatives], "candidates_explored": self.explored,
            "assumptions": self.assumptions, **({"levers": self.levers} if self.levers else {}),
        }


def _fsdp_fields(setup: TrainSetup) -> dict:
    """The sharding of an FSDP plan (listed only for FSDP: ZeRO plans read as before)."""
    return {"sharding": "fsdp", "fsdp": setup.fsdp} if setup.sharding == "fsdp" else {}


def _divisors(n: int) -> list[int]:
    """The divisors of n, ascending (trial division up to sqrt(n))."""
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


def _sharding_options(setup: TrainSetup, shardings: tuple[str, ...] | None = None) -> list[dict]:
    """The sharding settings (TrainSetup changes) the frameworks accept for this setup: DeepSpeed's (ZeRO stage,
    offload) pairs and FSDP's (strategy, offload), of the `shardings` asked for (default: the setup's own)."""
    shardings = shardings or (setup.sharding,)
    out: list[dict] = []
    if "zero" in shardings:
        extra = {} if setup.sharding == "zero" else {"sharding": "zero", "fsdp": "full_shard"}
        out += [dict(extra, zero=zero, offload=offload) for zero, offload in _strategies(setup)]
    if "fsdp" in shardings:
        out += [dict(sharding="fsdp", zero=0, fsdp=fsdp, offload=offload)
                for fsdp, offload in _fsdp_strategies(setup)]
    return out


def _fsdp_strategies(setup: TrainSetup) -> list[tuple[str, str]]:
    """(FSDP strategy, offload) pairs: full_shard and shard_grad_op on several GPUs, hybrid_shard across nodes,
    full_shard with CPU offload (FSDP2 offloads parameters, gradients and the optimizer step together; bitsandbytes
    8-bit optimizers cannot step on the host). QLoRA shards 4-bit weights only."""
    if setup.method == "qlora" and setup.quant_bits != 4:
        return []
    pairs = []
    if setup.world_size > 1:
        pairs += [("full_shard", "none"), ("shard_grad_op", "none")]
        if setup.num_nodes > 1:
            pairs.append(("hybrid_shard", "none"))
    if setup.optimizer not in ("adamw-8bit", "paged-adamw-8bit"):
        pairs.append(("full_shard", "all"))
    return pairs


def _strategies(setup: TrainSetup) -> list[tuple[int, str]]:
    """(ZeRO stage, offload) pairs DeepSpeed accepts for this setup (QLoRA with ZeRO-3: 4-bit weights stored in the
    compute dtype, as LLaMA-Factory sets bnb_4bit_quant_storage; not with offload). `_sharding_options` adds FSDP's."""
    pairs = [(0, "none")]
    multi = setup.world_size > 1
    for zero in (1, 2, 3):
        if zero == 3 and ((setup.method == "qlora" and setup.quant_bits != 4) or setup.precision == "pure-bf16"):
            continue
        if zero == 3 and setup.method == "qlora":
            if multi:
                pairs.append((zero, "none"))
            continue
        if multi:
            pairs.append((zero, "none"))
        if setup.optimizer not in ("adamw-8bit", "paged-adamw-8bit"):
            if zero in (2, 3):
                pairs.append((zero, "optimizer"))
            if zero == 3:
                pairs.append((zero, "all"))
    return pairs


def plan(setup: TrainSetup, *, global_batch_size: int, margin: float = 0.10, num_samples: int | None = None,
         epochs: float = 1.0, mfu: float | None = None, attns: tuple[str, ...] | None = None,
         checkpointing: tuple[bool, ...] = (False, True), host_ram_bytes: int | None = None,
         host_ram_source: str | None = None, shardings: tuple[str, ...] | None = None,
         levers: bool = True) -> Plan:
    """The fastest settings whose estimated peak stays within capacity x (1 - margin) and whose host RAM per node
    stays within `host_ram_bytes` (default: the GPU type's stated assumption); see module docstring.
    `host_ram_source` says where a given `host_ram_bytes` comes from (shown with the plan). `shardings`: "zero" and/or
    "fsdp", the ways of sharding searched (default: the setup's `sharding`).

    `levers`: when nothing fits, switch on the memory levers that leave the training math unchanged, one more at a
    time (`memory_levers`: Liger's fused loss, the vision tower's checkpointing where it was off, offloaded
    checkpointing), and plan again; the first that fits is kept, with the reason first among the plan's reasons."""
    kwargs = dict(global_batch_size=global_batch_size, margin=margin, num_samples=num_samples, epochs=epochs,
                  mfu=mfu, attns=attns, checkpointing=checkpointing, host_ram_bytes=host_ram_bytes,
                  host_ram_source=host_ram_source, shardings=shardings)
    try:
        first: Plan | None = _search(setup, **kwargs)
    except NothingFits as nothing:
        first, error = None, nothing
    if not levers or (first is not None and first.setup.offload == "none"):
        if first is None:
            raise error
        return first
    # Nothing fits, or only with DeepSpeed CPU offload (slow at every step): the levers first
    switched: list[str] = []
    fallback: Plan | None = None
    for variant, what in memory_levers(setup):
        switched.append(what)
        try:
            result = _search(variant, **kwargs)
        except NothingFits:
            continue
        if first is None and fallback is None:
            fallback = _with_levers(result, switched, "nothing fits")
        if result.setup.offload == "none":
            return _with_levers(result, switched, "nothing fits" if first is None else
                                "only DeepSpeed CPU offload fits, which costs host transfers and CPU optimizer time "
                                "at every step")
    if first is not None:
        return first
    if fallback is not None:
        return fallback
    raise error


def _with_levers(result: Plan, switched: list[str], without: str) -> Plan:
    them = "them" if len(switched) > 1 else "it"
    result.reasons.insert(0, f"switched on {', '.join(switched)}: without {them} {without} (the training math is "
                             "unchanged)")
    result.levers = list(switched)
    return result


def memory_levers(setup: TrainSetup) -> list[tuple[TrainSetup, str]]:
    """The setups with one more memory lever switched on each (cumulative, the cheapest first), for levers that
    change where tensors live but not what is computed: Liger's fused linear cross-entropy where it applies
    (planner/memory/liger.py; its loss equals the unfused one up to float rounding), the vision tower checkpointed
    when the setup switched that off, and LLaMA-Factory's offloaded checkpointing (inputs in host RAM, which
    the host budget then has to hold)."""
    from .memory import liger

    out: list[tuple[TrainSetup, str]] = []
    current = setup

    def switch(what: str, **changes) -> None:
        nonlocal current
        if _refusal(current, **changes) is None:  # a lever the family cannot train with is none
            current = replace(current, **changes)
            out.append((current, what))

    # not where the patch fails at load on the modelled versions (liger 0.8.5's Qwen2-VL/2.5-VL forwards)
    # (and only where the fused loss applies: Mllama's patch leaves the logits)
    if setup.stage == "sft" and not setup.liger_kernel and \
            "fused_linear_cross_entropy" in liger.swaps(replace(setup, liger_kernel=True)) and \
            not liger.import_failure(replace(setup, liger_kernel=True)):
        switch("Liger's fused linear cross-entropy (enable_liger_kernel: no logits)", liger_kernel=True)
    if setup.vision_gradient_checkpointing is False:
        switch("the vision tower's gradient checkpointing", vision_gradient_checkpointing=None,
               gradient_checkpointing=True)
    if not setup.offload_checkpoints and setup.stack == "llamafactory":
        switch("offloaded gradient checkpointing (use_unsloth_gc: checkpointed inputs in host RAM)",
               offload_checkpoints=True, gradient_checkpointing=True)
    return out


def _search(setup: TrainSetup, *, global_batch_size: int, margin: float, num_samples: int | None, epochs: float,
            mfu: float | None, attns: tuple[str, ...] | None, checkpointing: tuple[bool, ...],
            host_ram_bytes: int | None, host_ram_source: str | None,
            shardings: tuple[str, ...] | None) -> Plan:
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or global_batch_size <= 0:
        raise VlplanError(f"--global-batch-size must be a positive integer, got {global_batch_size}")
    if global_batch_size > MAX_GLOBAL_BATCH_SIZE:
        raise VlplanError(f"--global-batch-size {global_batch_size} is above the {MAX_GLOBAL_BATCH_SIZE} samples per "
                          "optimizer step vlplan plans for")
    if not 0 <= margin < 1:
        raise VlplanError(f"--margin must be in [0, 1), got {margin}")
    if mfu is not None and not 0 < mfu <= 1:
        raise VlplanError(f"--mfu must be a fraction in (0, 1], got {mfu}")
    if num_samples is not None and num_samples < 0:
        raise VlplanError(f"--num-samples must be 0 (unknown) or more, got {num_samples}")
    if not (math.isfinite(epochs) and epochs > 0):
        raise VlplanError(f"--epochs must be a positive number, got {epochs}")
    assumed = host_ram_bytes is None
    if assumed:
        host_ram_bytes, host_ram_source = assumed_host_ram(setup.gpu, setup.num_gpus)
    elif isinstance(host_ram_bytes, bool) or not isinstance(host_ram_bytes, int) or host_ram_bytes <= 0:
        raise VlplanError(f"--host-ram-gib must be positive, got {host_ram_bytes} bytes")
    host_ram_source = host_ram_source or "given"
    host = HostBudget(host_ram_bytes, host_ram_source, assumed)
    reasons: list[str] = []
    dp = setup.world_size
    requested = global_batch_size
    if global_batch_size % dp:
        global_batch_size = max(dp, round(global_batch_size / dp) * dp)
        reasons.append(f"global batch {requested} is not a multiple of the {dp} data-parallel ranks; using "
                       f"{global_batch_size} (micro-batch x accumulation x ranks must equal it)")
    per_rank = global_batch_size // dp
    capacity = setup.gpu.memory_bytes
    budget = int(capacity * (1 - margin))
    attns = attns or (setup.attn,)
    fits: list[Candidate] = []
    largest_tried: dict = {}
    explored = 0
    for attn in attns:
        for gc in checkpointing:
            for sharding in _sharding_options(setup, shardings):
                micro, tried = _largest_micro(setup, per_rank, budget, host.bytes, attn=attn,
                                              gradient_checkpointing=gc, **sharding)
                explored += tried
                largest_tried[(attn, gc, *sharding.values())] = micro
                if micro is None:
                    continue
                chosen = _candidate(replace(setup, batch_size=micro, gradient_accumulation_steps=per_rank // micro,
                                            attn=attn, gradient_checkpointing=gc, **sharding), mfu)
                fits.append(chosen)
    if not fits:
        raise NothingFits(_nothing_fits_message(setup, budget, margin, per_rank, host, shardings))
    # Offloading is for setups that do not fit otherwise: its per-step costs beyond the modeled transfers and CPU
    # Adam time (DeepSpeed's swapping and host synchronisation) are not in the time model, which would otherwise
    # prefer it for small models where one fewer micro-step outweighs the modeled transfer time
    offloaded = [c for c in fits if c.setup.offload != "none"]
    if offloaded and len(offloaded) < len(fits):
        fits = [c for c in fits if c.setup.offload == "none"]
    fits.sort(key=lambda c: (c.time.seconds, c.estimate.peak_bytes))
    best = fits[0]
    reasons += _reasons(best, fits, budget, capacity, margin, per_rank, host)
    if shardings and len(set(shardings)) > 1:
        reasons.append(_sharding_reason(best, fits))
    if offloaded and best.setup.offload == "none":
        reasons.append("no CPU offload: settings without it fit, and offloading costs host transfers and CPU "
                       "optimizer time at every step")
    return Plan(best, global_batch_size, requested, margin, capacity, reasons, fits[1:6], num_samples, epochs,
                explored, _assumptions(best, host), host.bytes, host.source, host.assumed)


@dataclass(frozen=True)
class HostBudget:
    """Host RAM per node that a setting may use (processes and offloaded states), and where the number comes from."""

    bytes: int
    source: str
    assumed: bool = False  # the GPU type's assumption (scales with GPUs per node), not the user's or this machine's


def _candidate(setup: TrainSetup, mfu: float | None) -> Candidate:
    return Candidate(setup, _cached_estimate(setup), step_time(setup, mfu))


@lru_cache(maxsize=4096)
def _cached_estimate(setup: TrainSetup) -> Estimate:
    return estimate(setup)


def _fits(setup: TrainSetup, budget: int, host_budget: int | None = None, floor: bool = False) -> bool:
    """Whether the estimated peak is within the GPU budget and (when given) the host RAM per node within its own.
    With `floor`, whether its lower bound is (`peak_floor_bytes`: no caching-allocator replay): a setup whose floor
    does not fit does not fit."""
    try:
        if _cached_floor(setup) > budget or (host_budget is not None and not _fits_host(setup, host_budget)):
            return False
        if floor:
            return True
        e = _cached_estimate(setup)
    except VlplanError:
        return False
    return e.peak_bytes <= budget and (host_budget is None or e.cpu_ram_bytes <= host_budget)


@lru_cache(maxsize=4096)
def _cached_floor(setup: TrainSetup) -> int:
    return peak_floor_bytes(setup)


def _fits_host(setup: TrainSetup, host_budget: int) -> bool:
    return estimated_host_ram_bytes(setup) <= host_budget


def _largest_micro(setup: TrainSetup, per_rank: int, budget: int, host_budget: int | None,
                   **changes) -> tuple[int | None, int]:
    """The largest micro-batch dividing the per-rank batch that fits (memory grows with the micro-batch: binary
    search), and how many estimates it took. The search runs on the peak's lower bound (`peak_floor_bytes`, no
    caching-allocator replay) first; the full estimate then checks the largest micro-batch whose floor fits, and
    only when the reserved memory pushes it over the budget searches again below it: the replay runs for the one
    or few micro-batches at the boundary, not for every one tried."""
    options = _divisors(per_rank)
    try:  # settings the setup refuses whatever the micro-batch (ZeRO-3 with QLoRA, fa2 on a V100): none fits
        replace(setup, batch_size=1, gradient_accumulation_steps=per_rank, **changes)
    except VlplanError:
        return None, 0
    tried = 0

    def search(high: int, floor: bool) -> int | None:
        """The index of the largest option at or below `high` that fits (binary search), or None."""
        nonlocal tried
        low, best = 0, None
        while low <= high:
            mid = (low + high) // 2
            micro = options[mid]
            try:
                candidate = replace(setup, batch_size=micro, gradient_accumulation_steps=per_rank // micro,
                                    **changes)
            except VlplanError:  # past a size bound of the setup (images per micro-batch): larger ones are refused
                high = mid - 1
                continue
            tried += 1
            if _fits(candidate, budget, host_budget, floor=floor):
                best, low = mid, mid + 1
            else:
                high = mid - 1
        return best

    bound = search(len(options) - 1, floor=True)
    if bound is None:
        return None, tried
    micro = options[bound]
    tried += 1
    if _fits(replace(setup, batch_size=micro, gradient_accumulation_steps=per_rank // micro, **changes), budget,
             host_budget):
        return micro, tried
    best = search(bound - 1, floor=False)
    return (None if best is None else options[best]), tried


def _reasons(best: Candidate, fits: list[Candidate], budget: int, capacity: int, margin: float,
             per_rank: int, host: HostBudget) -> list[str]:
    s, e = best.setup, best.estimate
    reasons = [f"micro-batch {s.batch_size} x accumulation {s.gradient_accumulation_steps} x {s.world_size} ranks = "
               f"global batch {s.batch_size * s.gradient_accumulation_steps * s.world_size}"]
    larger = [d for d in _divisors(per_rank) if d > s.batch_size]
    if larger:
        try:
            bigger = replace(s, batch_size=larger[0], gradient_accumulation_steps=per_rank // larger[0])
            need = _cached_estimate(bigger).peak_bytes
            reasons.append(f"micro-batch {s.batch_size} is the largest that fits: peak {e.peak_bytes / GIB:.2f} GiB "
                           f"of the {budget / GIB:.2f} GiB budget ({100 * (1 - margin):.0f}% of "
                           f"{capacity / GIB:.2f} GiB); {larger[0]} would need {need / GIB:.2f} GiB")
        except VlplanError as err:
            reasons.append(f"micro-batch {s.batch_size} is the largest vlplan takes here: {larger[0]} is refused "
                           f"({err})")
    else:
        reasons.append(f"micro-batch {s.batch_size} takes the whole per-rank batch; peak {e.peak_bytes / GIB:.2f} "
                       f"GiB of the {budget / GIB:.2f} GiB budget")
    alt_gc = [c for c in fits if c.setup.gradient_checkpointing != s.gradient_checkpointing]
    if s.gradient_checkpointing:
        if not any(not c.setup.gradient_checkpointing for c in fits):
            reasons.append("gradient checkpointing on: without it nothing fits")
        else:
            faster = min(alt_gc, key=lambda c: c.time.seconds)
            reasons.append(f"gradient checkpointing on: it allows micro-batch {s.batch_size} (without it "
                           f"{faster.setup.batch_size}), {faster.time.seconds / best.time.seconds:.2f}x the step time")
    else:
        refused = _refusal(s, gradient_checkpointing=True)
        if refused:  # checkpointing is not an option here (e.g. Mllama LoRA on LLaMA-Factory's stack)
            reasons.append(f"gradient checkpointing off: with it the setup is refused ({refused})")
        else:
            reasons.append("gradient checkpointing off: it fits without, saving the recomputation "
                           f"(~{100 * _recompute_share(s):.0f}% more compute with it)")
    if s.sharding == "fsdp":
        reasons.append(f"FSDP {s.fsdp}{' with CPU offload' if s.offload != 'none' else ''}: {_fsdp_reason(best, fits)}")
    elif s.zero:
        reasons.append(f"ZeRO-{s.zero}{' with ' + s.offload + ' offload' if s.offload != 'none' else ''}: "
                       f"{_zero_reason(best, fits)}")
    elif s.world_size > 1:
        reasons.append("plain DDP (ZeRO 0): the model states fit on every GPU, so no partitioning traffic")
    if s.offload != "none":
        reasons.append(f"offload needs {e.cpu_ram_bytes / GIB:.0f} GiB of host RAM per node "
                       f"({', '.join(f'{k} {v / GIB:.0f} GiB' for k, v in e.cpu_breakdown_bytes.items())}) of the "
                       f"{host.bytes / GIB:.0f} GiB budget ({host.source})")
    reasons.append(f"estimated step {best.time.seconds:.2f} s at {100 * best.time.mfu:.0f}% MFU "
                   f"({', '.join(f'{k} {v:.2f} s' for k, v in best.time.parts.items() if v > 0.005)})")
    if best.time.assumed_throughput_of:
        reasons.append(f"the GPU's throughput is unknown (given by its memory only): step times assume the tensor "
                       f"rate of a {best.time.assumed_throughput_of} (use --gpu NAME for a catalog GPU)")
    return reasons


def _refusal(setup: TrainSetup, **changes) -> str | None:
    """Why `setup` with `changes` is refused (by its validation, or by its family: `BaseModel.check_setup`, what the
    real step cannot train), or None when the estimator takes it."""
    try:
        changed = replace(setup, **changes)
        model_for(changed.model.family).check_setup(changed)
    except VlplanError as err:
        return str(err)
    return None


def _recompute_share(setup: TrainSetup) -> float:
    on = step_time(replace(setup, gradient_checkpointing=True)).parts
    return on.get("recompute", 0.0) / max(on.get("compute", 1e-9), 1e-9)


def _zero_reason(best: Candidate, fits: list[Candidate]) -> str:
    ddp = [c for c in fits if c.setup.zero == 0]
    if not ddp:
        return "without partitioning the model states nothing fits"
    fastest_ddp = min(ddp, key=lambda c: c.time.seconds)
    return (f"partitioning frees memory for micro-batch {best.setup.batch_size} (ZeRO 0: "
            f"{fastest_ddp.setup.batch_size}) and is faster overall ({best.time.seconds:.2f} s vs "
            f"{fastest_ddp.time.seconds:.2f} s per step)")


def _label(setup: TrainSetup) -> str:
    return f"FSDP {setup.fsdp}" if setup.sharding == "fsdp" else f"ZeRO-{setup.zero}"


def _fsdp_reason(best: Candidate, fits: list[Candidate]) -> str:
    others = [c for c in fits if c.setup.sharding == "fsdp" and c.setup.fsdp != best.setup.fsdp]
    if not others:
        return "the only FSDP strategy that fits"
    other = min(others, key=lambda c: c.time.seconds)
    return (f"{best.time.seconds:.2f} s per step against {other.time.seconds:.2f} s for {other.setup.fsdp} "
            f"(micro-batch {best.setup.batch_size} vs {other.setup.batch_size})")


def _sharding_reason(best: Candidate, fits: list[Candidate]) -> str:
    """Why FSDP or ZeRO (`--sharding auto`): the fastest candidate of the other kind, or that none of it fits."""
    kind = best.setup.sharding
    other = [c for c in fits if c.setup.sharding != kind]
    name = {"fsdp": "FSDP", "zero": "DeepSpeed ZeRO"}
    if not other:
        return f"{name[kind]}: no {name['zero' if kind == 'fsdp' else 'fsdp']} setting fits"
    runner = min(other, key=lambda c: (c.time.seconds, c.estimate.peak_bytes))
    comm = {k: v for k, v in best.time.parts.items() if k.startswith(("allgather", "reduce_scatter", "allreduce"))}
    return (f"{name[kind]} ({_label(best.setup)}) over {name[runner.setup.sharding]} ({_label(runner.setup)}, "
            f"offload {runner.setup.offload}): {best.time.seconds:.2f} s against {runner.time.seconds:.2f} s per step "
            f"(micro-batch {best.setup.batch_size} vs {runner.setup.batch_size}; peak "
            f"{best.estimate.peak_bytes / GIB:.2f} vs {runner.estimate.peak_bytes / GIB:.2f} GiB; communication "
            f"{sum(comm.values()):.2f} s)")


def _assumptions(best: Candidate, host: HostBudget) -> dict:
    from . import throughput

    return {"host_ram_per_node": f"{host.bytes / GIB:.0f} GiB: {host.source}",
            "mfu": best.time.mfu, "micro_step_overhead_s": throughput.MICRO_STEP_OVERHEAD_S,
            "internode_gbps": throughput.INTERNODE_GBPS, "intranode_gbps": best.setup.gpu.link_gbps,
            "pcie_gbps": throughput.PCIE_GBPS, "cpu_adam_params_per_s": throughput.CPU_ADAM_PARAMS_PER_S,
            "overlap": "none (upper bound on step time)",
            "tensor_rate_of": best.time.assumed_throughput_of or best.setup.gpu.name}


def _nothing_fits_message(setup: TrainSetup, budget: int, margin: float, per_rank: int, host: HostBudget,
                          shardings: tuple[str, ...] | None = None) -> str:
    """Why nothing fits (the smallest peak found, or the host RAM when a setting fits the GPUs but not the host) and
    which changes would fit."""
    smallest = host_limited = None
    # the smallest settings checkpoint, unless the setup cannot (e.g. Mllama LoRA on LLaMA-Factory's stack)
    refused = _refusal(setup, batch_size=1, gradient_accumulation_steps=per_rank, gradient_checkpointing=True)
    checkpointing = refused is None
    for sharding in _sharding_options(setup, shardings):
        try:
            e = _cached_estimate(replace(setup, batch_size=1, gradient_accumulation_steps=per_rank,
                                         gradient_checkpointing=checkpointing, **sharding))
        except VlplanError:
            continue
        if smallest is None or e.peak_bytes < smallest.peak_bytes:
            smallest = e
        if e.peak_bytes <= budget and e.cpu_ram_bytes > host.bytes and (
                host_limited is None or e.cpu_ram_bytes < host_limited.cpu_ram_bytes):
            host_limited = e
    parts = [f"nothing fits {setup.world_size} x {setup.gpu.name} within {budget / GIB:.1f} GiB "
             f"({100 * (1 - margin):.0f}% of capacity) and {host.bytes / GIB:.0f} GiB of host RAM per node "
             f"({host.source})"]
    if refused is not None:
        parts.append(f"gradient checkpointing is refused here ({refused})")
    suggestions = []
    if host_limited is not None:
        s, need = host_limited.setup, host_limited.cpu_ram_bytes
        parts.append(f"host RAM is the limit: {_label(s)} with offload {s.offload} fits the GPUs (micro-batch 1"
                     f"{', checkpointing' if checkpointing else ''}: peak {host_limited.peak_bytes / GIB:.1f} GiB) but needs "
                     f"{need / GIB:.0f} GiB of host RAM per node ("
                     + ", ".join(f"{k} {v / GIB:.0f} GiB" for k, v in host_limited.cpu_breakdown_bytes.items()) + ")")
        suggestions.append(f"--host-ram-gib {math.ceil(need / GIB)} (nodes with that much RAM)")
    elif smallest is not None:
        s = smallest.setup
        parts.append(f"the smallest setting (micro-batch 1{', checkpointing' if checkpointing else ''}, {_label(s)}, "
                     f"offload {s.offload}) needs "
                     f"{smallest.peak_bytes / GIB:.1f} GiB")
    suggestions += _suggestions(setup, budget, per_rank, host, checkpointing)
    if suggestions:
        parts.append("would fit: " + "; ".join(suggestions))
    else:
        parts.append("nothing tried fits: a larger GPU or a smaller model")
    return ". ".join(parts)


def _suggestions(setup: TrainSetup, budget: int, per_rank: int, host: HostBudget,
                 checkpointing: bool = True) -> list[str]:
    tries: list[tuple[str, object]] = []  # (label, a function making the changed setup)
    try:
        base = replace(setup, batch_size=1, gradient_accumulation_steps=per_rank, gradient_checkpointing=checkpointing)
    except VlplanError:  # e.g. offloaded checkpointing without checkpointing: nothing to suggest from here
        return []
    for gpus in (2, 4, 8):
        if gpus > setup.num_gpus and setup.method != "qlora" and setup.precision != "pure-bf16":
            tries.append((f"--num-gpus {gpus} with ZeRO-3",
                          lambda gpus=gpus: replace(base, num_gpus=gpus, zero=3, offload="none")))
    if setup.method != "qlora" and setup.precision != "pure-bf16":
        tries.append(("ZeRO-3 with full CPU offload (--zero 3 --offload all)",
                      lambda: replace(base, zero=3, offload="all")))
    if setup.method in ("lora", "full") and setup.zero != 3:
        tries.append(("QLoRA 4-bit (--method qlora)", lambda: _qlora(base)))
    if setup.images and setup.image_max_pixels:
        pixels = setup.image_max_pixels // 4
        tries.append((f"--image-max-pixels {pixels}", lambda: replace(base, image_max_pixels=pixels)))
    if setup.seq_len >= 1024:
        tries.append((f"--seq-len {setup.seq_len // 2}", lambda: replace(base, seq_len=setup.seq_len // 2)))
    found = []
    for label, make in tries:
        try:
            candidate = make()  # a change the setup refuses (e.g. a sequence too short for its images) is no answer
        except VlplanError:
            continue
        if candidate is None:
            continue
        if not checkpointing and _refusal(candidate, gradient_checkpointing=True) is None:
            candidate = replace(candidate, gradient_checkpointing=True)  # the change allows checkpointing (QLoRA)
        # an assumed budget is per GPU, so more GPUs per node come with more host RAM; a given one is the node's
        host_bytes = assumed_host_ram(candidate.gpu, candidate.num_gpus)[0] if host.assumed else host.bytes
        if _fits(candidate, budget, host_bytes):
            found.append(label)
    return found


def _qlora(setup: TrainSetup) -> TrainSetup | None:
    from .setup import Train

    try:
        return replace(setup, method="qlora", quant_bits=4, language=Train.LORA,
                       vision=Train.LORA if setup.vision is not Train.FROZEN else Train.FROZEN, zero=0,
                       offload="none")
    except VlplanError:
        return None
