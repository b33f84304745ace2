"""Hardware sizing rows: for each model, method, sequence length, image size and GPU type, the estimated per-GPU peak
at micro-batch 1, the largest micro-batch one GPU holds, and the fewest GPUs of that type that hold micro-batch 1
(with the ZeRO stage and offload it takes).

Every number is `vlplan estimate` on the setup the row states (tests/test_tables.py holds rows to it). The table
runs one simulation per distinct step (the simulation ignores the cluster: `step.simulation_key`), so a row per GPU
type costs only the analytic ZeRO/overhead terms once its model, method, sequence and image are simulated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..planner import cache
from ..planner.errors import VlplanError
from ..planner.hardware import GPU
from ..planner.memory.estimate import Estimate, estimate, peak_floor_bytes
from ..planner.plan import _strategies
from ..planner.registry import resolve
from ..planner.setup import ATTENTIONS, TrainSetup, make_setup
from ..planner.tokens import LF_IMAGE_MAX_PIXELS

METHODS = ("full", "freeze", "lora", "qlora")
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)  # fewest-GPU search: whole nodes of 8 beyond 8
GPUS_PER_NODE = 8
MAX_MICRO_BATCH = 16  # the largest micro-batch searched (a table cell shows 16 as ">=16")


@dataclass(frozen=True)
class Conditions:
    """What every row assumes besides its own columns (stated with each table)."""

    images: int = 1  # images per sample, all of the row's size
    margin: float = 0.10  # a setup fits when its peak is at most (1 - margin) of the GPU's memory
    gradient_checkpointing: bool = True
    attn: str = "sdpa"
    lora_rank: int = 8
    quant_bits: int = 4  # QLoRA
    image_max_pixels: int = LF_IMAGE_MAX_PIXELS  # LLaMA-Factory pre-resizes larger images down to this many pixels

    def __post_init__(self):
        if self.images < 0:
            raise VlplanError(f"--images must be 0 or more, got {self.images}")
        if not 0 <= self.margin < 1:
            raise VlplanError(f"--margin must be in [0, 1), got {self.margin}")
        if self.attn not in ATTENTIONS:
            raise VlplanError(f"--attn {self.attn!r} is not one of {', '.join(ATTENTIONS)}")
        if self.lora_rank <= 0:
            raise VlplanError(f"--lora-rank must be positive, got {self.lora_rank}")
        if self.quant_bits not in (4, 8):
            raise VlplanError(f"--quant-bits must be 4 or 8, got {self.quant_bits}")
        if self.image_max_pixels <= 0:
            raise VlplanError(f"--image-max-pixels must be positive, got {self.image_max_pixels}")

    def describe(self) -> str:
        return (f"{self.images} image(s) per sample, pre-resized to at most {self.image_max_pixels:,} pixels "
                f"(LLaMA-Factory image_max_pixels); LLaMA-Factory defaults (vision tower and projector frozen, LoRA "
                f"rank {self.lora_rank} on all language-model linears, QLoRA {self.quant_bits}-bit, freeze: last 2 "
                f"layers); bf16 AMP (fp16 on GPUs without bf16); AdamW; {self.attn} attention; gradient "
                f"checkpointing {'on' if self.gradient_checkpointing else 'off'}; fits = peak <= "
                f"{100 * (1 - self.margin):g}% of GPU memory; peaks include CUDA context, cuBLAS workspace and "
                f"allocator reserve")


@dataclass(frozen=True)
class Row:
    model: str
    method: str
    seq_len: int
    image_size: str  # "WxH", or "-" without images
    vision_tokens: int | None  # per sample
    gpu: str
    gpu_memory_bytes: int
    peak_bytes: int | None  # one GPU, micro-batch 1, no ZeRO
    peak_phase: str | None
    max_micro_batch: int | None  # one GPU, no ZeRO; None when micro-batch 1 does not fit
    fewest_gpus: int | None  # of this type at micro-batch 1 without offloading; None beyond GPU_COUNTS[-1]
    strategy: str | None  # "single GPU", "DDP", "ZeRO-2", ... for fewest_gpus
    fewest_gpus_offload: int | None  # the same when DeepSpeed offloads to the host; None when that needs no fewer
    strategy_offload: str | None  # "ZeRO-3 + offload all", ...
    offload_host_ram_bytes: int | None  # host RAM per node the offloading strategy needs
    note: str = ""  # why a row has no numbers (the setup is invalid: sequence too short, ...)

    def to_dict(self) -> dict:
        return asdict(self)


def row_setup(model: str, method: str, seq_len: int, image_size: tuple[int, int] | None, gpu: GPU,
              conditions: Conditions, **changes) -> TrainSetup:
    """The setup a row states, as `vlplan estimate` builds it from the same flags."""
    precision = "bf16" if gpu.bf16 else "fp16"
    images = conditions.images if image_size is not None else 0
    return make_setup(resolve(model), method=method, seq_len=seq_len, num_images=images,
                      image_size=image_size if images else None, gpu=gpu, precision=precision,
                      gradient_checkpointing=conditions.gradient_checkpointing, attn=conditions.attn,
                      lora_rank=conditions.lora_rank if method in ("lora", "qlora") else None,
                      image_max_pixels=conditions.image_max_pixels,
                      quant_bits=conditions.quant_bits if method == "qlora" else None, **changes)


def compute_rows(models: list[str], methods: list[str], gpus: list[GPU], seq_lens: list[int],
                 image_sizes: list[tuple[int, int] | None], conditions: Conditions = Conditions(),
                 progress=None, workers: int = 1) -> list[Row]:
    """All rows, in model, method, sequence length, image size, GPU order. Each model/method/sequence/image group
    (one row per GPU type, sharing their simulations) is a task; `workers` > 1 runs tasks in that many processes.
    `progress(n)` is called as each group's n rows are done."""
    tasks = [(model, method, seq_len, image_size) for model in models for method in methods
             for seq_len in seq_lens for image_size in image_sizes]
    if workers <= 1 or len(tasks) < 2:
        groups = []
        for task in tasks:
            groups.append(_group(task, gpus, conditions))
            if progress is not None:
                progress(len(groups[-1]))
        return [row for group in groups for row in group]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    # tasks of one model and method next to each other in a chunk reuse a worker's parameter inventories
    chunk = max(1, min(16, len(tasks) // (workers * 8)))
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        groups = []
        for group in pool.map(_group, tasks, [gpus] * len(tasks), [conditions] * len(tasks), chunksize=chunk):
            groups.append(group)
            if progress is not None:
                progress(len(group))
    return [row for group in groups for row in group]


def _group(task: tuple, gpus: list[GPU], conditions: Conditions) -> list[Row]:
    """One group's rows, read from the persistent cache (planner/cache.py) when an earlier table computed them with
    the same code; the key holds the resolved model spec, so an edited local config.json is not read back."""
    model, method, seq_len, image_size = task
    try:
        spec = resolve(model)
    except VlplanError:
        spec = None
    key = (spec, method, seq_len, image_size, tuple(gpus), conditions)
    stored = cache.load(CACHE_NAMESPACE, key)
    if isinstance(stored, list) and len(stored) == len(gpus):
        try:
            return [Row(**row) for row in stored]
        except TypeError:  # malformed entry: recompute
            pass
    rows = [gpu_row(model, method, seq_len, image_size, gpu, conditions) for gpu in gpus]
    cache.store(CACHE_NAMESPACE, key, [row.to_dict() for row in rows])
    return rows


CACHE_NAMESPACE = "table-rows"


def gpu_row(model: str, method: str, seq_len: int, image_size: tuple[int, int] | None, gpu: GPU,
            conditions: Conditions) -> Row:
    size = f"{image_size[0]}x{image_size[1]}" if image_size is not None else "-"
    common = dict(model=model, method=method, seq_len=seq_len, image_size=size, gpu=gpu.name,
                  gpu_memory_bytes=gpu.memory_bytes)
    try:
        setup = row_setup(model, method, seq_len, image_size, gpu, conditions)
    except VlplanError as err:
        return Row(**common, vision_tokens=None, peak_bytes=None, peak_phase=None, max_micro_batch=None,
                   fewest_gpus=None, strategy=None, fewest_gpus_offload=None, strategy_offload=None,
                   offload_host_ram_bytes=None, note=str(err).split(";")[0])
    budget = int(gpu.memory_bytes * (1 - conditions.margin))
    first = estimate(setup)
    largest = _largest_micro_batch(setup, first, budget)
    fewest, strategy, _ = _fewest_gpus(setup, budget, offload=False)
    fewest_off, strategy_off, host = _fewest_gpus(setup, budget, offload=True)
    if fewest is not None and (fewest_off is None or fewest_off >= fewest):  # offloading buys nothing here
        fewest_off = strategy_off = host = None
    return Row(**common, vision_tokens=setup.vision_tokens_per_sample, peak_bytes=first.peak_bytes,
               peak_phase=first.peak_phase, max_micro_batch=largest, fewest_gpus=fewest, strategy=strategy,
               fewest_gpus_offload=fewest_off, strategy_offload=strategy_off, offload_host_ram_bytes=host)


def _largest_micro_batch(setup: TrainSetup, first: Estimate, budget: int) -> int | None:
    """The largest micro-batch up to MAX_MICRO_BATCH whose estimate fits `budget`, found with few estimates:
    memory grows with the micro-batch, nearly linearly (convex: the peak is the largest of affine terms), so the
    line through micro-batches 1 and 2 predicts the answer from above; regula falsi then brackets it exactly.

    The full estimate replays the step through the caching-allocator model, so the search avoids it: it guesses
    with the peak's lower bound (`peak_floor_bytes`, no replay) plus micro-batch 1's reserve, then proves the guess
    with full estimates at it and one above (a floor over the budget proves a size does not fit without a replay),
    and only when the guess is off searches again on full estimates, below the guess or up to the largest size
    whose floor fits. The answer is that of a search on full estimates."""
    if first.peak_bytes > budget:
        return None
    floors = {1: peak_floor_bytes(setup)}
    peaks = {1: first.peak_bytes}

    def floor(batch: int) -> int:
        if batch not in floors:
            floors[batch] = peak_floor_bytes(replace(setup, batch_size=batch))
        return floors[batch]

    def full(batch: int) -> int:  # the floor where it is over the budget already (no replay needed to know)
        if batch not in peaks:
            peaks[batch] = floor(batch) if floor(batch) > budget else estimate(
                replace(setup, batch_size=batch)).peak_bytes
        return peaks[batch]

    # a guess: the floor plus micro-batch 1's reserve (the reserve grows with the micro-batch, so it guesses high)
    reserve_1 = first.peak_bytes - floors[1]
    guessed = _largest_under({1: first.peak_bytes}, lambda batch: floor(batch) + reserve_1, budget,
                             MAX_MICRO_BATCH + 1)
    if guessed > 1 and full(guessed) > budget:  # too high: the answer is below it
        return _largest_under(peaks, full, budget, guessed)
    if guessed == MAX_MICRO_BATCH or full(guessed + 1) > budget:  # proven: the guess fits, one more does not
        return guessed
    # too low: the answer is between the guess + 1 and the largest micro-batch whose floor fits
    bound = _largest_under(floors, floor, budget, MAX_MICRO_BATCH + 1)
    if full(bound) <= budget:
        return bound
    peaks_above = {1: peaks[guessed + 1]}  # regula falsi from guess + 1 (it fits) to bound (it does not)
    offset = guessed
    return offset + _largest_under(peaks_above, lambda b: full(b + offset), budget, bound - offset)


def _largest_under(peaks: dict[int, int], compute, budget: int, high: int) -> int:
    """The largest batch in [1, high) whose peak fits `budget`, given that batch 1 fits: regula falsi over the
    peaks (`peaks`, the ones known, filled with `compute(batch)`); `high` is known not to fit, or is past the cap
    (MAX_MICRO_BATCH + 1), where the line through the last two fitting sizes (1 and 2 at first) extrapolates."""

    def peak(batch: int) -> int:
        if batch not in peaks:
            peaks[batch] = compute(batch)
        return peaks[batch]

    low = 1  # peak(low) fits; high is the smallest size known not to (or past the cap)
    while high - low > 1:
        if high <= MAX_MICRO_BATCH:  # bracketed: the line through both ends (regula falsi)
            left, right = low, high
        else:  # extrapolate the line through the last two fitting sizes (1 and 2 at first)
            left, right = (max(b for b in peaks if b < low), low) if low > 1 else (1, 2)
        slope = (peak(right) - peak(left)) / (right - left)
        guess = low + int((budget - peak(low)) / slope) if slope > 0 else high - 1
        guess = min(max(guess, low + 1), high - 1)
        if peak(guess) <= budget:
            low = guess
        else:
            high = guess
    return low


def _fewest_gpus(setup: TrainSetup, budget: int, offload: bool) -> tuple[int | None, str | None, int | None]:
    """The fewest GPUs holding micro-batch 1 and the first strategy that does (plan's order: DDP, ZeRO-1/2/3; with
    `offload`, only the offloading ones: ZeRO-2/3 + optimizer, ZeRO-3 + all), with the host RAM per node it needs."""
    for count, name, candidate in fewest_gpu_candidates(setup, offload):
        if peak_floor_bytes(candidate) > budget:  # its lower bound is over: no replay needed to rule it out
            continue
        result = estimate(candidate)
        if result.peak_bytes <= budget:
            return count, name, result.cpu_ram_bytes
    return None, None, None


def fewest_gpu_candidates(setup: TrainSetup, offload: bool):
    """The setups the fewest-GPU search tries, in its order, as (GPU count, strategy name, setup): every count of
    GPU_COUNTS, and at each the strategies of plan's order (without or only with CPU offload) the setup accepts."""
    for count in GPU_COUNTS:
        per_node = min(count, GPUS_PER_NODE)
        try:
            sized = replace(setup, num_gpus=per_node, num_nodes=count // per_node)
        except VlplanError:
            continue
        for zero, where in _strategies(sized):
            if (where != "none") != offload:
                continue
            try:
                candidate = replace(sized, zero=zero, offload=where)
            except VlplanError:
                continue
            yield count, strategy_name(zero, where, count), candidate


def strategy_name(zero: int, offload: str, count: int) -> str:
    if zero == 0:
        return "single GPU" if count == 1 else "DDP"
    name = f"ZeRO-{zero}"
    if offload == "optimizer":
        name += " + offload optimizer"
    elif offload == "all":
        name += " + offload all"
    return name
