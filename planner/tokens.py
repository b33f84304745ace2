"""Image (and video) -> vision-encoder patches and language-model tokens, per family.

Each image first goes through LLaMA-Factory's pre-resize (`image_max_pixels`, `image_min_pixels`; mm_plugin.py
`MMPluginMixin._preprocess_image`), then through the checkpoint image processor's own rule. The rules below mirror
the transformers image processors named in each function; `tests/test_tokens.py` holds them equal to the installed
processors on hundreds of random sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import VlplanError
from .spec import ModelSpec, ProcessorSpec

# LLaMA-Factory defaults (src/llamafactory/hparams/model_args.py, ProcessorArguments)
LF_IMAGE_MAX_PIXELS = 768 * 768
LF_IMAGE_MIN_PIXELS = 32 * 32


@dataclass(frozen=True)
class ImageTokens:
    width: int
    height: int
    resized_width: int  # the size the encoder sees (for tiling families: the tiled canvas)
    resized_height: int
    vision_patches: int  # sequence length through the vision encoder, summed over tiles/views (CLS included)
    llm_tokens: int  # placeholder tokens in the language-model sequence
    special_tokens: int  # text tokens the processor adds around the placeholders
    views: int = 1  # images/tiles the encoder runs on

    def to_dict(self) -> dict:
        return dict(width=self.width, height=self.height, resized_width=self.resized_width,
                    resized_height=self.resized_height, vision_patches=self.vision_patches,
                    llm_tokens=self.llm_tokens, special_tokens=self.special_tokens, views=self.views)


def llamafactory_preresize(width: int, height: int, image_max_pixels: int | None,
                           image_min_pixels: int | None) -> tuple[int, int]:
    """LLaMA-Factory's `_preprocess_image`: scale both sides by sqrt(limit / (w*h)) with int() truncation."""
    if image_max_pixels and width * height > image_max_pixels:
        factor = math.sqrt(image_max_pixels / (width * height))
        original = f"{width}x{height}"
        width, height = int(width * factor), int(height * factor)
        if width == 0 or height == 0:
            # LLaMA-Factory then calls image.resize((width, height)), which PIL refuses ("height and width must
            # be > 0"): the training would crash on this image
            raise VlplanError(f"an image of {original} shrinks to {width}x{height} px under --image-max-pixels "
                              f"{image_max_pixels} (LLaMA-Factory truncates each scaled side), which PIL cannot "
                              "resize to; raise --image-max-pixels or crop the image")
    if image_min_pixels and width * height < image_min_pixels:
        factor = math.sqrt(image_min_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    return width, height


def qwen_plugin_preresize(width: int, height: int) -> tuple[int, int]:
    """LLaMA-Factory `Qwen2VLPlugin._preprocess_image`: min side 28, aspect ratio capped at 180:1 beyond 200:1."""
    if min(width, height) < 28:
        width, height = max(width, 28), max(height, 28)
    if width / height > 200:
        width, height = height * 180, height
    if height / width > 200:
        width, height = width, width * 180
    return width, height


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers models/qwen2_vl/image_processing_pil_qwen2_vl.py::smart_resize (Python's round: half to even)."""
    if max(height, width) / min(height, width) > 200:
        raise VlplanError(
            f"an image of {width}x{height} has an aspect ratio above 200, which the Qwen image processor refuses; "
            "crop or pad it"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _qwen(p: ProcessorSpec, width: int, height: int) -> tuple[int, int, int, int, int]:
    factor = p.patch_size * p.merge_size
    rh, rw = smart_resize(height, width, factor, p.min_pixels, p.max_pixels)
    patches = (rh // p.patch_size) * (rw // p.patch_size)
    return rw, rh, patches, patches // (p.merge_size**2), 1


def _fixed(p: ProcessorSpec, width: int, height: int) -> tuple[int, int, int, int, int]:
    grid = (p.image_size // p.patch_size) ** 2
    # CLIP-style encoders add a CLS token that the projector drops ("default" feature select strategy)
    return p.image_size, p.image_size, grid + 1, p.tokens_per_view, 1


_RULES = {"qwen_smart_resize": _qwen, "fixed": _fixed}


# Rules of the tiling / fixed-view families live in planner/families/<family>/tokens.py (`RULES = {name: fn}`,
# fn(processor, width, height) -> (resized_width, resized_height, vision_patches, llm_tokens, views)), imported on
# first use through the family registry.


def _rule(name: str):
    if name in _RULES:
        return _RULES[name]
    from .families import token_rules

    return token_rules().get(name)


def uses_qwen2vl_plugin(model_type: str) -> bool:
    """Whether LLaMA-Factory applies the Qwen pre-resize on top of the generic one (the family registry says)."""
    from .families import family_of

    family = family_of(model_type)
    return bool(family and family.qwen2vl_plugin)


def image_tokens(spec: ModelSpec, width: int, height: int, *, image_max_pixels: int | None = LF_IMAGE_MAX_PIXELS,
                 image_min_pixels: int | None = LF_IMAGE_MIN_PIXELS, llamafactory: bool = True) -> ImageTokens:
    """Patches and tokens of one W x H image after LLaMA-Factory's preprocessing (its pre-resize to
    `image_max_pixels`/`image_min_pixels` and the plugin's own fixes), then the processor's rule.
    `llamafactory=False`: the transformers processor alone, as in plain transformers training. Memoized on the spec
    object and the arguments."""
    key = (id(spec), width, height, image_max_pixels, image_min_pixels, llamafactory)
    hit = _IMAGE_TOKENS.get(key)
    if hit is not None and hit[0] is spec:
        return hit[1]
    tokens = _image_tokens(spec, width, height, image_max_pixels, image_min_pixels, llamafactory)
    if len(_IMAGE_TOKENS) >= 4096:
        _IMAGE_TOKENS.clear()
    _IMAGE_TOKENS[key] = (spec, tokens)  # the spec is kept alive, so its id is not reused meanwhile
    return tokens


_IMAGE_TOKENS: dict[tuple, tuple] = {}


def _image_tokens(spec: ModelSpec, width: int, height: int, image_max_pixels: int | None,
                  image_min_pixels: int | None, llamafactory: bool) -> ImageTokens:
    if width <= 0 or height <= 0:
        raise VlplanError(f"image size must be positive, got {width}x{height}")
    for value, flag in ((image_max_pixels, "--image-max-pixels"), (image_min_pixels, "--image-min-pixels")):
        if value is not None and value < 0:
            raise VlplanError(f"{flag} must be positive, got {value}")
    rule = _rule(spec.processor.rule)
    if rule is None:
        raise VlplanError(f"no image-token rule {spec.processor.rule!r} for {spec.name}")
    w, h = width, height
    if llamafactory:
        w, h = llamafactory_preresize(width, height, image_max_pixels, image_min_pixels)
        if uses_qwen2vl_plugin(spec.family):
            w, h = qwen_plugin_preresize(w, h)
    rw, rh, patches, tokens, views, *special = rule(spec.processor, w, h)
    # a rule may return a sixth value: the special tokens of this image when they depend on its size (tile tags)
    special_tokens = special[0] if special else spec.processor.special_tokens_per_image
    return ImageTokens(width, height, rw, rh, patches, tokens, special_tokens, views)


def parse_size(text: str) -> tuple[int, int]:
    """'1920x1080' -> (1920, 1080); '768' -> (768, 768)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise VlplanError(f"image size {text!r} is not WIDTHxHEIGHT (e.g. 1920x1080)") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise VlplanError(f"image size {text!r} must be two positive integers, WIDTHxHEIGHT")
    return values[0], values[1]
