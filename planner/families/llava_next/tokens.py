"""LLaVA-NeXT (v1.6) "anyres" tiling: transformers models/llava_next/image_processing_pil_llava_next.py
(`LlavaNextImageProcessor.get_image_patches`) and processing_llava_next.py (`LlavaNextProcessor._get_number_of_features`).

The image is fitted into the best of the checkpoint's `image_grid_pinpoints` (`select_best_resolution`, image_processing_utils.py:
the canvas that keeps the most original pixels, then the least padding), resized with its aspect ratio kept, padded to
that canvas and cut into 336-px tiles; a 336x336 base view of the whole image comes first. CLIP runs on every view, so
the vision tower sees `views * 577` positions (576 patches + CLS; padded views of a batch are dropped again by
`LlavaNextModel.get_image_features`). The language model gets the base view's 576 features plus the tiles' features
with the padding rows or columns cut away (`unpad_image`), and one `image_newline` per remaining row.
"""

from __future__ import annotations

from ...errors import VlplanError
from ...spec import ProcessorSpec


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """transformers image_processing_utils.select_best_resolution -> (height, width) of the best canvas: the one that
    keeps the most original pixels after an aspect-preserving downscale (`int()` truncation), on a tie the one that
    wastes the least area; the first of equals wins."""
    best, best_effective, best_waste = None, 0, float("inf")
    for canvas_height, canvas_width in pinpoints:
        scale = min(canvas_width / width, canvas_height / height)
        downscaled_width, downscaled_height = int(width * scale), int(height * scale)
        effective = min(downscaled_width * downscaled_height, width * height)
        waste = canvas_width * canvas_height - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (canvas_height, canvas_width), effective, waste
    return best


def unpadded_grid(height: int, width: int, grid_rows: int, grid_columns: int) -> tuple[int, int]:
    """`LlavaNextProcessor._get_unpadded_features` / modeling `unpad_image`: the (rows, columns) of tile features left
    after cutting the padding of an image of height x width fitted into a grid of feature rows x columns (5.23 rounds
    with `int(round(x, 7))` in both places)."""
    if width / height > grid_columns / grid_rows:
        new_rows = int(round(height * (grid_columns / width), 7))
        padding = (grid_rows - new_rows) // 2
        return grid_rows - 2 * padding, grid_columns
    new_columns = int(round(width * (grid_rows / height), 7))
    padding = (grid_columns - new_columns) // 2
    return grid_rows, grid_columns - 2 * padding


def anyres_layout(p: ProcessorSpec, width: int, height: int) -> tuple[int, int, int, int]:
    """(canvas height, canvas width, unpadded feature rows, unpadded feature columns) of one image."""
    if not p.pinpoints:
        raise VlplanError("the llava_next_anyres rule needs the checkpoint's image_grid_pinpoints (ProcessorSpec.pinpoints)")
    canvas_height, canvas_width = select_best_resolution(height, width, p.pinpoints)
    side = p.image_size // p.patch_size  # 24 features per tile side
    rows, columns = unpadded_grid(height, width, side * (canvas_height // p.image_size),
                                  side * (canvas_width // p.image_size))
    return canvas_height, canvas_width, rows, columns


def _llava_next_anyres(p: ProcessorSpec, width: int, height: int) -> tuple[int, int, int, int, int]:
    canvas_height, canvas_width, rows, columns = anyres_layout(p, width, height)
    views = 1 + (canvas_height // p.image_size) * (canvas_width // p.image_size)
    positions_per_view = (p.image_size // p.patch_size) ** 2 + 1  # CLS included
    # base view (CLS dropped by the "default" feature select strategy) + unpadded tiles + one newline per row
    tokens = p.tokens_per_view + rows * columns + rows
    return canvas_width, canvas_height, views * positions_per_view, tokens, views


RULES = {"llava_next_anyres": _llava_next_anyres}
