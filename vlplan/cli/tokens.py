"""`vlplan tokens`: image size -> vision-encoder patches and language-model tokens."""

from __future__ import annotations

import typer

from vlplan.planner.errors import VlplanError
from vlplan.planner.registry import resolve
from vlplan.planner.setup import MAX_IMAGE_SIDE, check_pixel_limits
from vlplan.planner.tokens import image_tokens, parse_size

from .options import errors
from .render import console, print_json, table


def tokens_command(
    model: str = typer.Option(..., "--model", "-m", help="Registry name, hub id or local config."),
    image: list[str] = typer.Option(..., "--image", help="Image WxH; repeat for several images."),
    image_max_pixels: int = typer.Option(768 * 768, "--image-max-pixels", help="LLaMA-Factory pre-resize cap."),
    image_min_pixels: int = typer.Option(32 * 32, "--image-min-pixels", help="LLaMA-Factory pre-resize floor."),
    json_: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """How many patches and tokens each image costs, after LLaMA-Factory's pre-resize and the model's processor."""
    with errors():
        check_pixel_limits(image_max_pixels, image_min_pixels)
        spec = resolve(model)
        sizes = [parse_size(size) for size in image]
        for width, height in sizes:
            if max(width, height) > MAX_IMAGE_SIDE:
                raise VlplanError(f"image side ({width}x{height}) {max(width, height)} is above vlplan's bound of "
                                  f"{MAX_IMAGE_SIDE} px")
        results = [image_tokens(spec, width, height, image_max_pixels=image_max_pixels,
                                image_min_pixels=image_min_pixels) for width, height in sizes]
    data = {"model": spec.name, "images": [t.to_dict() for t in results],
            "total_llm_tokens": sum(t.llm_tokens for t in results),
            "total_special_tokens": sum(t.special_tokens for t in results),
            "total_vision_patches": sum(t.vision_patches for t in results)}
    if json_:
        print_json(data)
        return
    rows = [[f"{t.width}x{t.height}", f"{t.resized_width}x{t.resized_height}", t.views, t.vision_patches,
             t.llm_tokens, t.special_tokens] for t in results]
    console.print(table(f"{spec.name} image tokens", ["image", "resized", "views", "encoder patches", "LLM tokens",
                                                       "special"], rows, {2, 3, 4, 5}))
    console.print(f"total: {data['total_llm_tokens']} LLM tokens + {data['total_special_tokens']} special")
