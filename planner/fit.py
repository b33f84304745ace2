"""What a plan means for the scanned data: the worst micro-batch it planned for, the samples above its cutoff_len,
and the samples LLaMA-Factory would crash on ("Image features and image tokens do not match").

The crash: LLaMA-Factory's supervised preprocessing does not drop a sample longer than `cutoff_len`, it truncates
it (src/llamafactory/data/processor/supervised.py `_encode_data_example`: `infer_seqlen(len(source_ids),
len(target_ids), cutoff_len - total_length)`, then `source_ids[:source_len]`), after the processor has expanded each
image into its run of image tokens (mm_plugin.py `process_messages`). A cut through that run leaves fewer image
tokens than the image has features, and the model's forward stops (transformers modeling_qwen2_5_vl.py
`get_placeholder_mask`: "Image features and image tokens do not match"). The prompt holding the images is cut from
its end, so a sample over the cutoff is at risk whenever the cut reaches its images (the scan counts tokens per
sample, not their positions: every over-cutoff sample with images is listed), and certain to crash when its image
tokens alone exceed the cutoff.
"""

from __future__ import annotations

from .heaviest import heaviest_samples, loads_from_scan
from .setup import TrainSetup
from .tokens import image_tokens

FIRST_IDS = 5  # sample ids listed in a warning
GIB = 2**30


def tokens_at(scan, setup: TrainSetup, image_max_pixels: int | None) -> tuple[list[int], list[int]]:
    """Per sample of the scan: total tokens and image tokens (special ones included) at the cap."""
    return count_tokens(scan, setup.model, setup.image_min_pixels, image_max_pixels)


def count_tokens(scan, spec, image_min_pixels: int | None, image_max_pixels: int | None
                 ) -> tuple[list[int], list[int]]:
    """Per sample of the scan: its text tokens plus its images' tokens by the family's rule after LLaMA-Factory's
    pre-resize at the cap (planner/tokens.py), and the image tokens alone (special ones included)."""
    cache: dict = {}
    totals, image = [], []
    for text, sizes in zip(scan.text_tokens, scan.image_sizes):
        vision = 0
        for size in sizes:
            if size not in cache:
                t = image_tokens(spec, *size, image_max_pixels=image_max_pixels, image_min_pixels=image_min_pixels)
                cache[size] = t.llm_tokens + t.special_tokens
            vision += cache[size]
        totals.append(text + vision)
        image.append(vision)
    return totals, image


def largest_cap_fitting(scan, setup: TrainSetup, samples: list[int], cutoff_len: int) -> int | None:
    """The largest image_max_pixels (up to the setup's) at which every one of `samples` fits `cutoff_len`, or None
    when none does (bisection over the token rule, which grows with the cap)."""
    def fits(pixels: int) -> bool:
        totals, _ = tokens_at(scan, setup, pixels)
        return all(totals[i] <= cutoff_len for i in samples)

    low, high = max(setup.image_min_pixels or 1, 1), setup.image_max_pixels or 2**31
    if not fits(low):
        return None
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return high if fits(high) else low


def data_statement(setup: TrainSetup, scan, budget_bytes: int | None = None) -> dict:
    """The plan's setup against the scanned data: the worst micro-batch (its `batch_size` heaviest samples, by the
    estimate, priced as `batch_size` copies of the heaviest: an upper bound, how the planner plans a dataset), the
    share of samples above its cutoff_len, and the samples that would crash LLaMA-Factory with the fix. With
    `budget_bytes`, a worst micro-batch over it is a warning. `notes` and `warnings` are the lines to show."""
    from dataclasses import replace

    from .errors import VlplanError
    from .memory.estimate import estimate

    cutoff = setup.seq_len + 1 if setup.packing else setup.seq_len
    totals, image = tokens_at(scan, setup, setup.image_max_pixels)
    n = len(totals)
    ranked = heaviest_samples(setup, loads_at(scan, totals, image), min(setup.batch_size, n))
    above = [i for i, t in enumerate(totals) if t > cutoff]
    at_risk = [i for i in above if image[i] > 0]
    certain = [i for i in at_risk if image[i] > cutoff]
    statement = {
        "cutoff_len": cutoff, "samples": n,
        "worst_micro_batch": [r.to_dict() for r in ranked],
        "above_cutoff": len(above), "share_above_cutoff": round(len(above) / n, 4) if n else 0.0,
        "first_above_cutoff": above[:FIRST_IDS],
        "image_token_mismatch": len(at_risk), "first_image_token_mismatch": at_risk[:FIRST_IDS],
        "image_tokens_over_cutoff": len(certain), "fix": None, "notes": [], "warnings": [],
    }
    worst = ranked[0]
    try:
        peak = estimate(replace(setup, images=worst.load.images, seq_len=max(worst.load.tokens, 1))).peak_bytes
    except VlplanError as err:
        peak, why = None, str(err)
    statement["worst_micro_batch_peak_bytes"] = peak
    ids = ", ".join("#" + str(r.load.index) for r in ranked)
    statement["notes"].append(
        f"worst micro-batch planned for: sample(s) {ids} (the {len(ranked)} heaviest by the estimate; the heaviest "
        f"#{worst.load.index}: {worst.load.tokens} tokens, "
        + (f"images {', '.join(f'{w}x{h}' for w, h in worst.load.images)}" if worst.load.images else "no image")
        + (f"): {peak / GIB:.2f} GiB as {setup.batch_size} x the heaviest" if peak is not None else
           f"): not estimated ({why})"))
    if peak is not None and budget_bytes is not None and peak > budget_bytes:
        statement["warnings"].append(
            f"the worst micro-batch needs {peak / GIB:.2f} GiB, above the {budget_bytes / GIB:.2f} GiB budget: the "
            "plan's estimate is for a lighter sample (the --percentile one, or the longest where another weighs more); "
            "the heaviest samples will run out of memory (`vlplan run` probes them first): drop --percentile, plan "
            "with a smaller micro-batch, or leave them out")
    statement["notes"].append(f"{len(above)} of {n} samples ({100 * len(above) / n:.1f}%) are longer than "
                              f"cutoff_len {cutoff}" + (f" and truncated by LLaMA-Factory (first: "
                                                        f"{', '.join('#' + str(i) for i in above[:FIRST_IDS])})"
                                                        if above else ""))
    if at_risk:
        longest = max(totals[i] for i in at_risk)
        cap = largest_cap_fitting(scan, setup, at_risk, cutoff)
        fixes = [f"cutoff_len {longest} (the longest of them)"]
        if cap is not None and cap < (setup.image_max_pixels or 0):
            fixes.append(f"image_max_pixels {cap}")
        fixes.append("drop them from the dataset")
        statement["fix"] = fixes
        statement["warnings"].append(
            f"{len(at_risk)} sample(s) with images are longer than cutoff_len {cutoff}"
            + (f" ({len(certain)} with more image tokens than the cutoff)" if certain else "")
            + ": LLaMA-Factory's truncation cuts into their image tokens and the model stops with 'Image features "
            f"and image tokens do not match' (first: {', '.join('#' + str(i) for i in at_risk[:FIRST_IDS])}); fix: "
            + " or ".join(fixes))
    return statement


def loads_at(scan, totals: list[int], image: list[int]):
    """The scan's sample loads with tokens counted at another cap."""
    from .heaviest import SampleLoad

    return [SampleLoad(load.index, totals[load.index], image[load.index], load.images)
            for load in loads_from_scan(scan)]
