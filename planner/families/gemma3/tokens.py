"""Gemma 3 image views: transformers models/gemma3/image_processing_pil_gemma3.py (Gemma3ImageProcessor).

Every view is resized to `image_size` (896) square: SigLIP sees (896/14)^2 = 4096 patches (no CLS token) and the
projector average-pools them to `tokens_per_view` (256) tokens (models/gemma3/modeling_gemma3.py
`Gemma3MultiModalProjector`). Pan & scan (off in the checkpoints and in LLaMA-Factory unless
`image_do_pan_and_scan`) adds crops of the input image as extra views (`pan_and_scan`): only when the aspect ratio
reaches `pan_and_scan_min_ratio`, 2..`max_tiles` crops along the long side, none if a crop would be smaller than
`pan_and_scan_min_crop_size`.
"""

from __future__ import annotations

import math

from ...spec import ProcessorSpec


def pan_and_scan_crops(p: ProcessorSpec, width: int, height: int) -> int:
    """Number of pan & scan crops of a W x H image (0 when pan & scan is off or does not activate)."""
    if not p.do_pan_and_scan:
        return 0
    if width >= height:
        if width / height < p.pan_and_scan_min_ratio:
            return 0
        columns = int(math.floor(width / height + 0.5))  # half rounds up
        columns = min(int(math.floor(width / p.pan_and_scan_min_crop_size)), columns)
        columns = min(p.max_tiles, max(2, columns))
        rows = 1
    else:
        if height / width < p.pan_and_scan_min_ratio:
            return 0
        rows = int(math.floor(height / width + 0.5))
        rows = min(int(math.floor(height / p.pan_and_scan_min_crop_size)), rows)
        rows = min(p.max_tiles, max(2, rows))
        columns = 1
    crop_width, crop_height = int(math.ceil(width / columns)), int(math.ceil(height / rows))
    if min(crop_width, crop_height) < p.pan_and_scan_min_crop_size:
        return 0
    return columns * rows


# Gemma3Processor.replace_image_token (processing_gemma3.py) with crops: "Here is the original image {view} and here
# are some crops to help you see better " + " ".join([view] * crops). 15 words; the Gemma tokenizer is not available
# offline, so the prose counts one token per word plus one per joining space (unverified estimate).
PAN_AND_SCAN_PROSE_WORDS = 15


def _gemma3(p: ProcessorSpec, width: int, height: int) -> tuple:
    crops = pan_and_scan_crops(p, width, height)
    views = 1 + crops
    per_view = (p.image_size // p.patch_size) ** 2
    size = (p.image_size, p.image_size, views * per_view, views * p.tokens_per_view, views)
    if not crops:
        return size
    # every view is a full_image_sequence ("\n\n", <start_of_image>, tokens, <end_of_image>, "\n\n"), plus the prose
    special = views * p.special_tokens_per_image + PAN_AND_SCAN_PROSE_WORDS + crops - 1
    return (*size, special)


RULES = {"gemma3": _gemma3}
