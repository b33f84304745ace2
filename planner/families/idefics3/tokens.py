"""Idefics3 and SmolVLM-Instruct image tiles: transformers models/idefics3/image_processing_pil_idefics3.py
(`Idefics3ImageProcessorPil._preprocess`: resize, resize_for_vision_encoder, split_images) and the placeholder text
of processing_idefics3.py (`Idefics3Processor.replace_image_token`).

Every image is resized (up or down) so its longest edge is `longest_edge`, then each side is rounded up to a
multiple of the tile size M (`max_image_size`); when that gives more than one tile, the image is cut into rows x cols
tiles of M x M plus one global view resized to M x M. Each view goes through the SigLIP encoder at (M / 14)**2
patches and becomes (M / 14)**2 / scale**2 LM tokens after the connector's pixel shuffle.
"""

from __future__ import annotations

import math

from ...spec import ProcessorSpec

# transformers image_processing_pil_idefics3.py MAX_IMAGE_SIZE: no side above this after the first resize
MAX_IMAGE_SIZE = 4096


def _rescale_to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
    """`_resize_output_size_rescale_to_max_len` (min_len 1): longest edge -> max_len, the other side int() and
    rounded up to an even number."""
    aspect_ratio = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect_ratio)
        if height % 2 != 0:
            height += 1
    elif height > width:
        height = max_len
        width = int(height * aspect_ratio)
        if width % 2 != 0:
            width += 1
    return max(height, 1), max(width, 1)


def _scale_below_upper_bound(height: int, width: int, max_len: int) -> tuple[int, int]:
    """`_resize_output_size_scale_below_upper_bound`."""
    aspect_ratio = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect_ratio)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect_ratio)
    return max(height, 1), max(width, 1)


def grid(p: ProcessorSpec, width: int, height: int) -> tuple[int, int, int, int]:
    """(rows, cols, resized_height, resized_width) of the tile grid; rows = cols = 0 for a single view."""
    tile = p.image_size
    height, width = _rescale_to_max_len(height, width, p.longest_edge)
    height, width = _scale_below_upper_bound(height, width, MAX_IMAGE_SIZE)
    # resize_for_vision_encoder on the resized image
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect_ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect_ratio) / tile) * tile
    if height > tile or width > tile:  # split_images
        return (height - tile) // tile + 1, (width - tile) // tile + 1, height, width
    return 0, 0, height, width


def special_tokens(rows: int, cols: int) -> int:
    """Text tokens around the placeholders (`Idefics3Processor.replace_image_token`, `_get_num_multimodal_tokens`):
    per tile <fake_token_around_image><row_r_col_c>, a newline per row, then (after one more newline that the Llama-3
    tokenizer merges with the last row's into one token) <fake_token_around_image><global-img> ...
    <fake_token_around_image>; a single view has only the last three."""
    return 2 * rows * cols + rows + 3


def _idefics3_tiles(p: ProcessorSpec, width: int, height: int) -> tuple[int, int, int, int, int, int]:
    rows, cols, resized_height, resized_width = grid(p, width, height)
    views = rows * cols + 1 if rows * cols else 1
    patches_per_view = (p.image_size // p.patch_size) ** 2
    return (resized_width, resized_height, views * patches_per_view, views * p.tokens_per_view, views,
            special_tokens(rows, cols))


RULES = {"idefics3_tiles": _idefics3_tiles}
