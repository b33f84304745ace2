"""Inverse planning: the largest `image_max_pixels`, `cutoff_len` or micro-batch that fits the GPU budget.

`maximize(setup, what, ...)` searches one setting with the others fixed (as given) or planned (with a global batch:
micro-batch, accumulation, checkpointing, ZeRO and offload chosen by `plan.plan` at every value tried). A value fits
when the estimated peak is within capacity x (1 - margin) and the host RAM within its budget (fixed), or when
`plan` finds a setting (planned). The search is exact over integers: a doubling search from the smallest value
to the first that does not fit, then a bisection to the boundary, so the answer fits and the next value up (answer
+ 1) does not, unless the answer is a bound: the data's own limit (no image is resized, no sample is cut) or
vlplan's bound on the setting.

The estimate grows with each of these settings (more pixels per image, more tokens, more samples per micro-batch),
which the bisection relies on; `Maximized.monotone_violations` lists any pair of values the search estimated that
contradicts it (a larger value that fits with a smaller one that does not), so a break is reported, not hidden.

How each value becomes a setup (`setup_at`):
- image-max-pixels changes token counts through the family's token rule after LLaMA-Factory's pre-resize
  (planner/tokens.py). With a dataset scan, every sample's tokens are counted again at the value and the setup
  takes the longest sample's images and length (as `dataset.setup_for_dataset` does); without one, the setup's
  images stay as given (`--image-size`), or are squares at the cap when none was given (the default image is one
  at the cap), and the sequence length stays: images whose tokens no longer fit it do not fit.
- cutoff-len is the sequence length. With a scan, a sample longer than the cutoff is truncated to it (LLaMA-Factory
  supervised.py `infer_seqlen`), and a sample whose image tokens alone do not fit is left out of the estimate: it
  cannot train at that cutoff ("Image features and image tokens do not match", reported as a cost).
- micro-batch is `batch_size` (accumulation kept).
- video-frames is refused: the search over video frames is not built yet (videos are estimated as given).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .errors import VlplanError
from .fit import count_tokens
from .memory.estimate import Estimate
from .setup import MAX_BATCH_SIZE, MAX_IMAGE_PIXELS, MAX_SEQ_LEN, TrainSetup
from .tokens import llamafactory_preresize

GIB = 2**30
# --maximize name -> (TrainSetup field, LLaMA-Factory YAML key)
MAXIMIZABLE = {"image-max-pixels": ("image_max_pixels", "image_max_pixels"),
               "cutoff-len": ("seq_len", "cutoff_len"),
               "micro-batch": ("batch_size", "per_device_train_batch_size")}
NOT_MODELLED = {"video-frames": "--maximize video-frames is not built yet (the estimate takes videos from --videos or "
                                "--dataset, but plan does not search their frames); maximize image-max-pixels, "
                                "cutoff-len or micro-batch, or estimate given --video-frames / --video-maxlen"}
# Extra values checked below the answer for monotonicity, besides those the search estimated
MONOTONE_PROBES = 4
FIRST_IDS = 5  # sample ids listed in a data cost


@dataclass
class Maximized:
    """The largest value that fits, why the next one does not, and what it costs the data."""

    what: str  # image-max-pixels | cutoff-len | micro-batch
    key: str  # the LLaMA-Factory key
    value: int
    setup: TrainSetup  # at the value (planned: the plan's chosen setup)
    estimate: Estimate
    budget_bytes: int
    bound: str  # "memory": value + 1 does not fit; "data": the data needs no more; "limit": vlplan's bound
    next_value: int | None
    next_reason: str | None  # why value + 1 does not fit (its peak, or the refusal)
    lowest: int
    estimated: dict[int, bool] = field(default_factory=dict)  # every value the search tried -> fits
    monotone_violations: list[str] = field(default_factory=list)
    data_cost: dict | None = None
    plan: object | None = None  # plan.Plan at the value (planned mode)
    reasons: list[str] = field(default_factory=list)
    margin: float = 0.10
    host_ram_bytes: int = 0
    host_ram_source: str = ""
    host_ram_assumed: bool = False

    def to_dict(self) -> dict:
        return {"what": self.what, "key": self.key, "value": self.value, "bound": self.bound,
                "next_value": self.next_value, "next_reason": self.next_reason, "lowest": self.lowest,
                "budget_bytes": self.budget_bytes, "peak_bytes": self.estimate.peak_bytes,
                "values_estimated": len(self.estimated), "monotone_violations": self.monotone_violations,
                "data_cost": self.data_cost, "reasons": self.reasons, "settings": self.setup.describe()}


class _Scan:
    """A dataset scan's per-sample text tokens and image sizes, with tokens counted again at any cap."""

    def __init__(self, scan, spec, image_min_pixels):
        self.scan = scan
        self.spec = spec
        self.min_pixels = image_min_pixels
        self.text = list(scan.text_tokens)
        self.sizes = list(scan.image_sizes)
        self._counted: dict = {}

    def tokens(self, max_pixels: int | None) -> tuple[list[int], list[int]]:
        """Per sample: total tokens and image tokens (special ones included) at the cap."""
        if max_pixels not in self._counted:
            self._counted[max_pixels] = count_tokens(self.scan, self.spec, self.min_pixels, max_pixels)
        return self._counted[max_pixels]


def _longest(totals: list[int], image: list[int], allowed=None, percentile: float | None = None) -> int | None:
    """The longest sample (ties: most image tokens, then the lower index), among `allowed` ones; with `percentile`,
    the sample at that percentile of total tokens (nearest rank), as `ScanResult.pick` chooses."""
    from .dataset import percentile_of

    target = percentile_of(totals, percentile) if percentile is not None else None
    best = None
    for i, (t, v) in enumerate(zip(totals, image)):
        if (allowed is not None and not allowed[i]) or (target is not None and t != target):
            continue
        if best is None or (t, v) > (totals[best], image[best]):
            best = i
    return best


def maximize(setup: TrainSetup, what: str, *, margin: float = 0.10, scan=None, percentile: float | None = None,
             images_at_cap: bool = False,
             global_batch_size: int | None = None, host_ram_bytes: int | None = None,
             host_ram_source: str | None = None, mfu: float | None = None) -> Maximized:
    """The largest value of `what` that fits (see the module docstring). `scan` (planner.dataset.ScanResult of the
    setup's model and caps) prices it in the data; `images_at_cap`: no image size was given, so the images are
    squares at the cap; `global_batch_size`: plan the other settings at each value (else they stay fixed)."""
    from .hardware import assumed_host_ram
    from .plan import _cached_estimate, plan

    if what in NOT_MODELLED:
        raise VlplanError(NOT_MODELLED[what])
    if what not in MAXIMIZABLE:
        raise VlplanError(f"--maximize {what!r} is not one of {', '.join(MAXIMIZABLE)}")
    if not 0 <= margin < 1:
        raise VlplanError(f"--margin must be in [0, 1), got {margin}")
    if global_batch_size is not None:
        from .plan import MAX_GLOBAL_BATCH_SIZE

        if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or global_batch_size <= 0:
            raise VlplanError(f"--global-batch-size must be a positive integer, got {global_batch_size}")
        if global_batch_size > MAX_GLOBAL_BATCH_SIZE:
            raise VlplanError(f"--global-batch-size {global_batch_size} is above the {MAX_GLOBAL_BATCH_SIZE} samples "
                              "per optimizer step vlplan plans for")
    if what == "micro-batch" and global_batch_size is not None:
        raise VlplanError("--maximize micro-batch keeps the other settings fixed; with --global-batch-size the plan "
                          "already picks the largest micro-batch that fits: drop one of them")
    if what == "image-max-pixels" and not setup.images and scan is None:
        raise VlplanError("--maximize image-max-pixels: the setup has no images (--images 0); give --images, "
                          "--image-size or --dataset")
    if scan is not None and scan.model != setup.model.name:
        raise VlplanError(f"the scan counted tokens for {scan.model}, the setup is {setup.model.name}")
    key = MAXIMIZABLE[what][1]
    budget = int(setup.gpu.memory_bytes * (1 - margin))
    host_assumed = host_ram_bytes is None
    if host_assumed:
        host_ram_bytes, host_ram_source = assumed_host_ram(setup.gpu, setup.num_gpus)
    data = _Scan(scan, setup.model, setup.image_min_pixels) if scan is not None else None
    at = _SetupAt(setup, what, data, images_at_cap, percentile)
    lowest, highest, data_limit = at.range()
    reasons_not: dict[int, str] = {}
    estimated: dict[int, bool] = {}  # every value tried -> whether it fits

    def fits(value: int) -> bool:
        if value in estimated:
            return estimated[value]
        try:
            candidate = at(value)
        except VlplanError as err:
            reasons_not[value] = f"refused: {err}"
            estimated[value] = False
            return False
        if global_batch_size is not None:
            why = _plannable(candidate, global_batch_size, budget, host_ram_bytes)
            if why:
                reasons_not[value] = why
            estimated[value] = not why
            return estimated[value]
        try:
            e = _cached_estimate(candidate)
        except VlplanError as err:
            reasons_not[value] = f"refused: {err}"
            estimated[value] = False
            return False
        ok = e.peak_bytes <= budget and e.cpu_ram_bytes <= host_ram_bytes
        if not ok:
            reasons_not[value] = (f"peak {e.peak_bytes / GIB:.3f} GiB > budget {budget / GIB:.3f} GiB"
                                  if e.peak_bytes > budget else
                                  f"host RAM {e.cpu_ram_bytes / GIB:.1f} GiB > {host_ram_bytes / GIB:.1f} GiB")
        estimated[value] = ok
        return ok

    if not fits(lowest):
        raise VlplanError(f"--maximize {what}: even {key} {lowest}, the smallest value, does not fit "
                          f"({reasons_not.get(lowest, 'over the budget')}); `vlplan plan -g N` without --maximize "
                          "says which settings would")
    # doubling search from the lowest value, then bisection between the last fit and the first misfit
    good, bad = lowest, None
    step = max(lowest, 1)
    while bad is None:
        trial = min(good + step, highest)
        if trial == good:
            break
        if fits(trial):
            good = trial
            step *= 2
        else:
            bad = trial
    if bad is not None:
        while bad - good > 1:
            middle = (good + bad) // 2
            if fits(middle):
                good = middle
            else:
                bad = middle
    value = good
    for k in range(1, MONOTONE_PROBES + 1):  # a few values below the answer: they must fit too
        below = lowest + (value - lowest) * k // (MONOTONE_PROBES + 1)
        fits(below)
    violations = [f"{key} {small} does not fit but {large} does"
                  for small in sorted(estimated) for large in sorted(estimated)
                  if small < large and not estimated[small] and estimated[large]][:3]
    if global_batch_size is not None:
        chosen_plan = plan(at(value), global_batch_size=global_batch_size, margin=margin, mfu=mfu,
                           host_ram_bytes=host_ram_bytes, host_ram_source=host_ram_source)
        final = chosen_plan.setup
        final_estimate = chosen_plan.chosen.estimate
    else:
        chosen_plan = None
        final = at(value)
        final_estimate = _cached_estimate(final)
    if bad is None:
        bound = "data" if data_limit is not None and value >= data_limit else "limit"
        next_value, next_reason = None, None
    else:
        next_value, next_reason = value + 1, reasons_not.get(value + 1, "")
        bound = "refused" if next_reason.startswith("refused") else "memory"
    result = Maximized(what, key, value, final, final_estimate, budget, bound, next_value, next_reason, lowest,
                       dict(estimated), violations, plan=chosen_plan, margin=margin, host_ram_bytes=host_ram_bytes,
                       host_ram_source=host_ram_source or "given", host_ram_assumed=host_assumed)
    if data is not None:
        result.data_cost = data_cost(what, value, data, at)
    result.reasons = _reasons(result, budget, margin, at, data_limit)
    return result


def _plannable(setup: TrainSetup, global_batch_size: int, budget: int, host_ram_bytes: int) -> str:
    """"" when `plan.plan` finds a setting for `setup` (some ZeRO stage and offload at micro-batch 1, the least
    memory a micro-batch needs, with or without checkpointing, fits), else why not. Cheaper than planning at every
    value: the plan itself is made once, at the answer."""
    from .plan import _cached_estimate, _sharding_options

    world = setup.world_size
    per_rank = max(world, round(global_batch_size / world) * world) // world if global_batch_size % world else \
        global_batch_size // world
    smallest = None
    for checkpointing in (True, False):
        for sharding in _sharding_options(setup):  # the setup's own way of sharding: ZeRO stages or FSDP's
            try:
                candidate = replace(setup, batch_size=1, gradient_accumulation_steps=per_rank,
                                    gradient_checkpointing=checkpointing, **sharding)
                e = _cached_estimate(candidate)
            except VlplanError:
                continue
            if e.peak_bytes <= budget and e.cpu_ram_bytes <= host_ram_bytes:
                return ""
            smallest = e.peak_bytes if smallest is None else min(smallest, e.peak_bytes)
    if smallest is None:
        return "refused: no ZeRO stage or offload accepts the setup"
    return f"no plan fits: the smallest setting needs {smallest / GIB:.3f} GiB > budget {budget / GIB:.3f} GiB"


class _SetupAt:
    """value -> the setup at that value (see the module docstring)."""

    def __init__(self, setup: TrainSetup, what: str, data: _Scan | None, images_at_cap: bool,
                 percentile: float | None = None):
        self.setup, self.what, self.data, self.images_at_cap = setup, what, data, images_at_cap
        self.percentile = percentile

    def range(self) -> tuple[int, int, int | None]:
        """(lowest value tried, vlplan's bound, the value beyond which the data changes nothing or None)."""
        s = self.setup
        if self.what == "micro-batch":
            return 1, MAX_BATCH_SIZE, None
        if self.what == "image-max-pixels":
            lowest = max(s.image_min_pixels or 1, 1)
            if self.data is not None:
                sizes = [w * h for sample in self.data.sizes for w, h in sample]
            else:
                sizes = [] if self.images_at_cap else [w * h for w, h in s.images]
            limit = max(sizes) if sizes else None
            return lowest, max(lowest, min(limit or MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS)), limit
        # cutoff-len
        if self.data is not None:
            totals, image = self.data.tokens(s.image_max_pixels)
            longest = max(totals)
            lowest = max(1, min(image))  # the smallest cutoff at which some sample keeps its image tokens
            return lowest, max(longest, lowest), longest
        # the images' tokens must fit the sequence (TrainSetup refuses less)
        return max(1, s.vision_tokens_per_sample + s.special_tokens_per_sample), MAX_SEQ_LEN, None

    def __call__(self, value: int) -> TrainSetup:
        s = self.setup
        if self.what == "micro-batch":
            return replace(s, batch_size=value)
        if self.what == "image-max-pixels":
            if self.data is not None:
                totals, image = self.data.tokens(value)
                i = _longest(totals, image, percentile=self.percentile)
                seq_len = max(totals[i], s.seq_len) if s.packing else totals[i]
                return replace(s, image_max_pixels=value, images=self.data.sizes[i], seq_len=max(seq_len, 1))
            if self.images_at_cap:
                side = math.isqrt(value)
                return replace(s, image_max_pixels=value, images=((side, side),) * len(s.images))
            return replace(s, image_max_pixels=value)
        if self.data is not None:  # cutoff-len over the data: samples truncated to the cutoff
            totals, image = self.data.tokens(s.image_max_pixels)
            trainable = [v <= value for v in image]
            i = _longest([min(t, value) for t in totals], image, trainable)
            if i is None:
                raise VlplanError(f"no sample's image tokens fit cutoff_len {value}")
            return replace(s, seq_len=value if s.packing else min(totals[i], value), images=self.data.sizes[i])
        return replace(s, seq_len=value)


def data_cost(what: str, value: int, data: _Scan, at: _SetupAt) -> dict:
    """What the value costs the scanned data: the images resized (and by how much) or the samples cut."""
    s = at.setup
    samples = len(data.text)
    if what == "image-max-pixels":
        resized_samples, scales = [], []
        for i, sizes in enumerate(data.sizes):
            hit = False
            for w, h in sizes:
                new = llamafactory_preresize(w, h, value, s.image_min_pixels)
                if new[0] * new[1] < w * h:
                    hit = True
                    scales.append(new[0] * new[1] / (w * h))
            if hit:
                resized_samples.append(i)
        before, _ = data.tokens(data.scan.image_max_pixels)
        after, _ = data.tokens(value)
        return {"samples": samples, "images_resized": len(scales), "samples_resized": len(resized_samples),
                "first_resized": resized_samples[:FIRST_IDS],
                "smallest_pixel_share": round(min(scales), 4) if scales else None,
                "median_pixel_share": round(sorted(scales)[len(scales) // 2], 4) if scales else None,
                "tokens_before": sum(before), "tokens_after": sum(after),
                "scanned_image_max_pixels": data.scan.image_max_pixels}
    totals, image = data.tokens(s.image_max_pixels)
    if what == "cutoff-len":
        cut = [i for i, t in enumerate(totals) if t > value]
        broken = [i for i in cut if image[i] > value]
        return {"samples": samples, "samples_cut": len(cut), "share_cut": round(len(cut) / samples, 4),
                "first_cut": cut[:FIRST_IDS], "tokens_lost": sum(totals[i] - value for i in cut),
                "image_tokens_do_not_fit": len(broken), "first_image_tokens_do_not_fit": broken[:FIRST_IDS]}
    return {"samples": samples}


def _reasons(result: Maximized, budget: int, margin: float, at: _SetupAt, data_limit: int | None) -> list[str]:
    key, value = result.key, result.value
    e = result.estimate
    reasons = [f"{key} {value}: peak {e.peak_bytes / GIB:.2f} GiB of the {budget / GIB:.2f} GiB budget "
               f"({100 * (1 - margin):.0f}% of {result.setup.gpu.memory_bytes / GIB:.2f} GiB)"]
    if result.bound in ("memory", "refused"):
        reasons.append(f"{key} {result.next_value} does not fit: {result.next_reason}")
    elif result.bound == "data":
        reasons.append(f"the data needs no more: at {key} {data_limit} "
                       + ("no image is resized" if result.what == "image-max-pixels" else "no sample is cut"))
    else:
        reasons.append(f"{key} {value} is vlplan's bound on the setting")
    reasons.append(f"exact: {len(result.estimated)} values estimated (doubling, then bisection); "
                   + ("the estimate grew with the value at every pair of them" if not result.monotone_violations
                      else "NOT monotone: " + "; ".join(result.monotone_violations)))
    cost = result.data_cost
    if cost and result.what == "image-max-pixels":
        if cost["images_resized"]:
            reasons.append(f"{cost['samples_resized']} of {cost['samples']} samples have images resized "
                           f"({cost['images_resized']} images, down to {100 * cost['smallest_pixel_share']:.0f}% "
                           f"of their pixels at most, median {100 * cost['median_pixel_share']:.0f}%; first: "
                           f"{', '.join('#' + str(i) for i in cost['first_resized'])})")
        else:
            reasons.append(f"no image of the {cost['samples']} samples is resized")
    if cost and result.what == "cutoff-len":
        reasons.append(f"{cost['samples_cut']} of {cost['samples']} samples ({100 * cost['share_cut']:.1f}%) are "
                       f"longer than {value} tokens and cut"
                       + (f"; first: {', '.join('#' + str(i) for i in cost['first_cut'])}" if cost['first_cut']
                          else ""))
        if cost["image_tokens_do_not_fit"]:
            reasons.append(f"{cost['image_tokens_do_not_fit']} of them have more image tokens than {value}: "
                           "LLaMA-Factory would crash on them ('Image features and image tokens do not match'); "
                           "drop them or lower image_max_pixels")
    return reasons


def maximized_plan(result: Maximized, *, num_samples: int | None = None, epochs: float = 1.0,
                   mfu: float | None = None):
    """The plan.Plan of a maximized setting (what `vlplan plan` renders and exports): the plan made at the value
    (planned), or the fixed settings at the value as the one candidate."""
    from .plan import Candidate, HostBudget, Plan, _assumptions
    from .throughput import step_time

    if result.plan is not None:
        chosen = result.plan
        chosen.num_samples, chosen.epochs = num_samples, epochs
        return chosen
    s = result.setup
    candidate = Candidate(s, result.estimate, step_time(s, mfu))
    host = HostBudget(result.host_ram_bytes, result.host_ram_source, result.host_ram_assumed)
    global_batch = s.batch_size * s.gradient_accumulation_steps * s.world_size
    fixed = (f"the other settings as given: micro-batch {s.batch_size}, accumulation {s.gradient_accumulation_steps}, "
             f"ZeRO {s.zero}, offload {s.offload}, checkpointing {'on' if s.gradient_checkpointing else 'off'} "
             "(--global-batch-size plans them)")
    return Plan(candidate, global_batch, global_batch, result.margin, s.gpu.memory_bytes, [fixed], [],
                num_samples, epochs, len(result.estimated), _assumptions(candidate, host), host.bytes, host.source,
                host.assumed)
