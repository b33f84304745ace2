"""InternVL3 (-hf) image tiles: transformers models/got_ocr2/image_processing_pil_got_ocr2.py (GotOcr2ImageProcessor).

Without `crop_to_patches` every image is resized to one `image_size` (448) tile. With it, the image is resized to the
tile grid (columns x rows) whose aspect ratio is closest to the image's (`get_optimal_tiled_canvas`), cut into tiles,
and a thumbnail of the whole image is appended when there is more than one tile (`crop_image_to_patches`,
use_thumbnail defaults to True). Each tile runs through InternViT as (448/14)^2 = 1024 patches plus a CLS token
(models/internvl/modeling_internvl.py `InternVLVisionEmbeddings`), and reaches the language model as 256 tokens after
the 0.5 pixel shuffle (`InternVLProcessor.image_seq_length`).

LLaMA-Factory calls the image processor directly and passes `crop_to_patches=True` only when its own
`crop_to_patches` argument is set (default False), so by default an image is one tile; `ProcessorSpec.crop_to_patches`
selects the tiled behaviour.
"""

from __future__ import annotations

from ...spec import ProcessorSpec


def supported_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """`get_all_supported_aspect_ratios`: (columns, rows) with min <= columns * rows <= max, stably sorted by area."""
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
             if min_tiles <= c * r <= max_tiles]
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def optimal_grid(p: ProcessorSpec, width: int, height: int) -> tuple[int, int]:
    """`get_optimal_tiled_canvas` -> (columns, rows): the grid whose aspect ratio is closest to W / H; on a tie a
    larger grid wins when the image covers more than half of its area."""
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for columns, rows in supported_grids(p.min_tiles, p.max_tiles):
        diff = abs(aspect - columns / rows)
        if diff < best_diff:
            best, best_diff = (columns, rows), diff
        elif diff == best_diff and area > 0.5 * p.image_size * p.image_size * columns * rows:
            best = (columns, rows)
    return best


def tile_patches(p: ProcessorSpec) -> int:
    """Positions of one tile through InternViT: (image_size / patch_size)^2 patches plus the CLS token."""
    return (p.image_size // p.patch_size) ** 2 + 1


def _internvl_tiles(p: ProcessorSpec, width: int, height: int) -> tuple[int, int, int, int, int]:
    columns, rows = 1, 1
    tiles = 1
    if p.crop_to_patches and p.max_tiles > 1:
        columns, rows = optimal_grid(p, width, height)
        tiles = columns * rows
        if tiles > 1 and p.use_thumbnail:
            tiles += 1
    return columns * p.image_size, rows * p.image_size, tiles * tile_patches(p), tiles * p.tokens_per_view, tiles


RULES = {"internvl_tiles": _internvl_tiles}
