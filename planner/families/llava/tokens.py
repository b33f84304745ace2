"""Pixtral native-resolution images: transformers models/pixtral/image_processing_pil_pixtral.py
(`get_resize_output_image_size`) and processing_pixtral.py (`PixtralProcessor` token layout).

An image larger than `longest_edge` (1024) on either side is scaled down so that it fits (sides floored), then each side
is rounded up to whole 16-px patches. The vision encoder runs on rows x columns patches (no CLS). The language model
sees rows of `[IMG]` placeholders, each row closed by `[IMG_BREAK]` and the last one by `[IMG_END]` (with
`spatial_merge_size` > 1, as in Mistral-Small-3.1, the placeholders count merged patches). LLaMA-Factory's
PixtralPlugin writes the same layout.
"""

from __future__ import annotations

import math

from ...errors import VlplanError
from ...spec import ProcessorSpec


def _pixtral(p: ProcessorSpec, width: int, height: int) -> tuple[int, int, int, int, int, int]:
    ratio = max(height / p.longest_edge, width / p.longest_edge)
    if ratio > 1:
        height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
    if height == 0 or width == 0:
        raise VlplanError(
            f"an image side shrinks to 0 px when Pixtral fits the longest edge into {p.longest_edge} px (aspect ratio "
            f"above {p.longest_edge}:1); the image processor refuses it, crop or pad the image"
        )
    rows = (height - 1) // p.patch_size + 1
    columns = (width - 1) // p.patch_size + 1
    merged_rows = rows // p.merge_size
    merged_columns = columns // p.merge_size
    # [IMG] placeholders receive vision features; one [IMG_BREAK] / [IMG_END] per row are ordinary text tokens
    return (columns * p.patch_size, rows * p.patch_size, rows * columns, merged_rows * merged_columns, 1,
            merged_rows)


RULES = {"pixtral": _pixtral}
