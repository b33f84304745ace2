"""Phi-3.5-vision HD crops (remote code, no transformers class; not checked against a processor here):
`Phi3VImageProcessor` of the hub repo's image_processing_phi3_v.py (`calc_hd_transform_size`, `HD_transform`,
`padding_336`, the `num_img_tokens` expression of `preprocess`).

The image (transposed so it is landscape) is resized to width scale * 336, the largest scale with
scale * ceil(scale / ratio) <= num_crops, its height padded up to a multiple of 336; the r x c crops of 336 x 336 plus
one global 336 x 336 view go through CLIP ViT-L/14-336. `pixel_values` is padded to num_crops + 1 views per image
(`pad_to_max_num_crops_tensor`) and `Phi3ImageEmbedding` runs CLIP on every slot, padding included, so the encoder
sees (num_crops + 1) * 577 positions per image. LM tokens: 144 per view (12 x 12 after the 2 x 2 merge), one
newline-separator per row of the sub-crop grid (12 per 336 px row, r + 1 rows counting the global view) and the
glb_GN separator.
"""

from __future__ import annotations

import math

from ...errors import VlplanError
from ...spec import ProcessorSpec


def hd_size(p: ProcessorSpec, width: int, height: int) -> tuple[int, int]:
    """`calc_hd_transform_size(width, height, hd_num=num_crops)` -> padded (width, height)."""
    crop = p.image_size
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= p.max_tiles:
        scale += 1
    scale -= 1
    new_width = int(scale * crop)
    new_height = int(new_width / ratio)
    if new_height == 0:
        raise VlplanError(f"an image of {width}x{height} is too elongated for the Phi-3-vision processor (it would be "
                          "resized to a height of 0 px); crop or pad it")
    padded_height = math.ceil(new_height / crop) * crop
    return (padded_height, new_width) if transposed else (new_width, padded_height)


def _phi3v_crops(p: ProcessorSpec, width: int, height: int) -> tuple[int, int, int, int, int]:
    resized_width, resized_height = hd_size(p, width, height)
    rows, cols = resized_height // p.image_size, resized_width // p.image_size
    grid = p.image_size // p.patch_size  # 24 x 24 patches per view
    merged = grid // p.merge_size  # 12 x 12 tokens per view after the 2 x 2 merge
    tokens = (rows * cols + 1) * p.tokens_per_view + 1 + (rows + 1) * merged
    slots = p.max_tiles + 1
    return resized_width, resized_height, slots * (grid * grid + 1), tokens, slots


RULES = {"phi3v_crops": _phi3v_crops}
