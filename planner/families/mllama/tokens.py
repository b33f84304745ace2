"""Llama 3.2 Vision (Mllama) image tiles: transformers models/mllama/image_processing_pil_mllama.py.

The image is resized into the best canvas of up to `max_tiles` tiles of `image_size` px (`get_optimal_tiled_canvas`,
`get_image_size_fit_to_canvas`), zero-padded and cut into tiles. `pack_images` always fills `max_tiles` tile slots per
image and `MllamaVisionModel.forward` runs every slot (padding tiles are masked, not skipped): each tile is 40*40
patches plus a class token (1601), padded to a multiple of 8 (1608), so the encoder sees `max_tiles * 1608` positions
per image whatever its size. The language model gets one <|image|> token per image; the tiles reach it only through
the cross-attention layers.
"""

from __future__ import annotations

from ...spec import ProcessorSpec


def supported_aspect_ratios(max_tiles: int) -> list[tuple[int, int]]:
    """`get_all_supported_aspect_ratios`: (a, b) tile arrangements with a*b <= max_tiles, in this order."""
    return [(a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles]


def tiled_canvas(height: int, width: int, max_tiles: int, tile_size: int) -> tuple[int, int]:
    """`get_optimal_tiled_canvas` -> (canvas_height, canvas_width).

    Canvases are (a * tile, b * tile) read as (height, width) (numpy `.T` of the arrangement list); each gets the
    scale min(ch / H, cw / W) (`np.where(scale_w > scale_h, scale_h, scale_w)`); the smallest scale >= 1 wins (the
    least upscaling), else the largest below 1; ties go to the smallest area, the first one on equal areas
    (`np.argmin`).
    """
    canvases = [(a * tile_size, b * tile_size) for a, b in supported_aspect_ratios(max_tiles)]
    scales = []
    for canvas_height, canvas_width in canvases:
        scale_h, scale_w = canvas_height / height, canvas_width / width
        scales.append(scale_h if scale_w > scale_h else scale_w)
    upscaling = [s for s in scales if s >= 1]
    selected = min(upscaling) if upscaling else max(s for s in scales if s < 1)
    chosen = [c for c, s in zip(canvases, scales) if s == selected]
    return min(chosen, key=lambda c: c[0] * c[1])  # min keeps the first of equal areas, like np.argmin


def tiles(p: ProcessorSpec, width: int, height: int) -> tuple[int, int]:
    """(tiles along the height, tiles along the width) of a W x H image."""
    canvas_height, canvas_width = tiled_canvas(height, width, p.max_tiles, p.image_size)
    return canvas_height // p.image_size, canvas_width // p.image_size


def aspect_ratio_id(p: ProcessorSpec, width: int, height: int) -> int:
    """`convert_aspect_ratios_to_ids_np`: 1 + the index of the (rows, cols) arrangement (0 is a padding slot)."""
    return supported_aspect_ratios(p.max_tiles).index(tiles(p, width, height)) + 1


def tile_positions(p: ProcessorSpec) -> int:
    """Positions of one tile through the encoder: patches + class token, padded to a multiple of 8
    (`num_padding_patches = (8 - (n % 8)) % 8` in MllamaVisionModel.forward)."""
    per_tile = (p.image_size // p.patch_size) ** 2 + 1
    return per_tile + (-per_tile % 8)


def _mllama_tiles(p: ProcessorSpec, width: int, height: int) -> tuple[int, int, int, int, int]:
    rows, cols = tiles(p, width, height)
    return cols * p.image_size, rows * p.image_size, p.max_tiles * tile_positions(p), p.tokens_per_view, p.max_tiles


RULES = {"mllama_tiles": _mllama_tiles}
