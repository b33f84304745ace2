"""MiniCPM-V 2.6 image slices (remote code, no transformers class; not checked against a processor here):
`MiniCPMVImageProcessor` of the hub repo's image_processing_minicpmv.py (`slice_image`, `get_sliced_grid`,
`find_best_resize`, `get_refine_size`, `get_slice_image_placeholder`).

An image of at most `scale_resolution`**2 px is one view upscaled to about 448 x 448 px (both sides multiples of 14).
A larger one becomes a source view (downscaled to about 448 x 448) plus cols x rows slices of about 448 x 448 each,
the grid chosen among the divisors of (multiple - 1, multiple, multiple + 1), multiple = ceil(W*H / 448**2) capped at
`max_slice_nums`. Every view becomes `image_feature_size` (64) LM tokens through the resampler.

The vision tower (`MiniCPMV.get_vllm_embedding`) pads every view of the batch to the longest one
(`pad_sequence`, a patch mask hides the padding): `vision_patches` counts the views of one image padded to that
image's longest view.
"""

from __future__ import annotations

import math

from ...errors import VlplanError
from ...spec import ProcessorSpec

# preprocessor_config.json of openbmb/MiniCPM-V-2_6 (read from copies): use_image_id true, slice_mode true
USE_IMAGE_ID = True


def _ensure_divide(length: float, patch_size: int) -> int:
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(width: float, height: float, scale_resolution: int, patch_size: int,
                     allow_upscale: bool = False) -> tuple[int, int]:
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return _ensure_divide(width, patch_size), _ensure_divide(height, patch_size)


def sliced_grid(p: ProcessorSpec, width: int, height: int) -> tuple[int, int] | None:
    """`get_sliced_grid` -> (cols, rows), or None when the image is not sliced."""
    log_ratio = math.log(width / height)
    ratio = width * height / (p.image_size * p.image_size)
    multiple = min(math.ceil(ratio), p.max_tiles)
    if multiple <= 1:
        return None
    candidates = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= p.max_tiles]
    grids = [(m, n // m) for n in candidates for m in range(1, n + 1) if n % m == 0]
    best, best_error = (1, 1), float("inf")
    for cols, rows in grids:
        error = abs(log_ratio - math.log(cols / rows))
        if error < best_error:
            best, best_error = (cols, rows), error
    return best


def view_sizes(p: ProcessorSpec, width: int, height: int) -> list[tuple[int, int]]:
    """(width, height) of every view the vision tower gets: the source view first, then the slices."""
    grid = sliced_grid(p, width, height)
    if grid is None:
        return [find_best_resize(width, height, p.image_size, p.patch_size, allow_upscale=True)]
    views = [find_best_resize(width, height, p.image_size, p.patch_size)]
    cols, rows = grid
    # get_refine_size: the image is resized so each slice is find_best_resize of (W / cols, H / rows), upscaled
    refine_width, refine_height = _ensure_divide(width, cols), _ensure_divide(height, rows)
    slice_size = find_best_resize(refine_width / cols, refine_height / rows, p.image_size, p.patch_size,
                                  allow_upscale=True)
    return views + [slice_size] * (cols * rows)


def special_tokens(p: ProcessorSpec, width: int, height: int, image_index: int = 0) -> int:
    """<image></image> around the source view, <slice></slice> around each slice, a newline between slice rows and,
    with use_image_id, <image_id>k</image_id> (the Qwen2 tokenizer splits the digits of k)."""
    grid = sliced_grid(p, width, height)
    special = 2
    if grid is not None:
        cols, rows = grid
        special += 2 * cols * rows + rows - 1
    if USE_IMAGE_ID:
        special += 2 + len(str(image_index))
    return special


def _minicpmv_slices(p: ProcessorSpec, width: int, height: int) -> tuple[int, int, int, int, int, int]:
    if p.patch_size <= 0 or p.image_size <= 0:
        raise VlplanError("minicpmv_slices needs the processor's patch_size and scale resolution (image_size)")
    views = view_sizes(p, width, height)
    longest = max((w // p.patch_size) * (h // p.patch_size) for w, h in views)
    source_width, source_height = views[0]
    return (source_width, source_height, len(views) * longest, len(views) * p.tokens_per_view, len(views),
            special_tokens(p, width, height))


RULES = {"minicpmv_slices": _minicpmv_slices}
