"""Image-token rules of InternVL3 (GotOcr2 tiles) and Gemma 3 (896 views, pan & scan) against the installed
transformers image processors (PIL backends, checkpoint preprocessor values), on hundreds of random sizes including
extreme aspect ratios."""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlplan.planner.registry import resolve
from vlplan.planner.tokens import image_tokens

transformers = pytest.importorskip("transformers")

INTERNVL = resolve("internvl3-8b")
GEMMA3 = resolve("gemma-3-4b")
# The tiled variants: InternVL with crop_to_patches (LLaMA-Factory `crop_to_patches: true`, or InternVLProcessor's own
# default), Gemma 3 with pan & scan (LLaMA-Factory `image_do_pan_and_scan: true`)
INTERNVL_TILED = replace(INTERNVL, processor=replace(INTERNVL.processor, crop_to_patches=True))
GEMMA3_PAN_AND_SCAN = replace(GEMMA3, processor=replace(GEMMA3.processor, do_pan_and_scan=True))

sizes = st.tuples(st.integers(1, 6000), st.integers(1, 6000))
extreme = st.one_of(sizes, st.tuples(st.integers(1, 40), st.integers(1, 8000)),
                    st.tuples(st.integers(1, 8000), st.integers(1, 40)),
                    # near the tile / crop thresholds, where ties and rounding decide
                    st.tuples(st.integers(200, 1400), st.integers(200, 1400)))
FAST = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _lf_preresize(image, max_pixels=768 * 768, min_pixels=32 * 32):
    """LLaMA-Factory mm_plugin `_preprocess_image`, executed with PIL as LLaMA-Factory does."""
    w, h = image.size
    if w * h > max_pixels:
        factor = (max_pixels / (w * h)) ** 0.5
        image = image.resize((int(w * factor), int(h * factor)))
    if image.width * image.height < min_pixels:
        factor = (min_pixels / (image.width * image.height)) ** 0.5
        image = image.resize((int(image.width * factor), int(image.height * factor)))
    return image


# InternVL ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def got_ocr2():
    from transformers import GotOcr2ImageProcessorPil

    p = INTERNVL.processor  # preprocessor_config.json of the -hf checkpoints: 448 px tiles, 1..12 tiles
    return GotOcr2ImageProcessorPil(size={"height": p.image_size, "width": p.image_size}, crop_to_patches=False,
                                    min_patches=p.min_tiles, max_patches=p.max_tiles)


def test_internvl_default_is_one_tile():
    """LLaMA-Factory's default (crop_to_patches False): one 448 tile of 1024 patches + CLS, 256 tokens."""
    for w, h in ((1920, 1080), (10, 10), (448, 448), (100, 3000)):
        got = image_tokens(INTERNVL, w, h)
        assert (got.views, got.vision_patches, got.llm_tokens) == (1, 1025, 256)
        assert (got.resized_width, got.resized_height) == (448, 448)
    assert INTERNVL.processor.special_tokens_per_image == 2  # <img> ... </img>


@settings(max_examples=300, **FAST)
@given(size=extreme)
def test_internvl_tiles_equal_processor(got_ocr2, size):
    w, h = size
    for spec, kwargs in ((INTERNVL, {"crop_to_patches": False}),
                         (INTERNVL_TILED, {"crop_to_patches": True}),
                         (replace(INTERNVL_TILED, processor=replace(INTERNVL_TILED.processor, max_tiles=6)),
                          {"crop_to_patches": True, "max_patches": 6})):
        expected = got_ocr2.get_number_of_image_patches(h, w, kwargs)
        got = image_tokens(spec, w, h, llamafactory=False)
        assert got.views == expected
        assert got.vision_patches == expected * 1025
        assert got.llm_tokens == expected * 256


@settings(max_examples=10, **FAST)
@given(size=st.tuples(st.integers(1, 2000), st.integers(1, 2000)))
def test_internvl_full_pipeline_on_pixels(got_ocr2, size):
    """The processor run on a real image gives as many 448x448 tiles as the rule."""
    from PIL import Image

    w, h = size
    out = got_ocr2(images=[Image.new("RGB", (w, h))], crop_to_patches=True, return_tensors="np")
    got = image_tokens(INTERNVL_TILED, w, h, llamafactory=False)
    assert out["pixel_values"].shape == (got.views, 3, 448, 448)
    assert list(out["num_patches"]) == [got.views]


@pytest.mark.slow
@settings(max_examples=200, **FAST)
@given(size=extreme)
def test_internvl_llamafactory_path(got_ocr2, size):
    """LLaMA-Factory's pre-resize (with PIL), then the processor with crop_to_patches as InternVLPlugin passes it."""
    from PIL import Image

    w, h = size
    image = _lf_preresize(Image.new("RGB", (w, h)))
    for spec, crop in ((INTERNVL, False), (INTERNVL_TILED, True)):
        expected = got_ocr2.get_number_of_image_patches(image.height, image.width, {"crop_to_patches": crop})
        assert image_tokens(spec, w, h).views == expected


# Gemma 3 -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3_processor():
    from transformers import Gemma3ImageProcessorPil

    p = GEMMA3.processor  # checkpoint size 896; pan & scan values as Gemma3Processor / LLaMA-Factory pass them
    return Gemma3ImageProcessorPil(size={"height": p.image_size, "width": p.image_size},
                                   pan_and_scan_min_crop_size=p.pan_and_scan_min_crop_size,
                                   pan_and_scan_max_num_crops=p.max_tiles,
                                   pan_and_scan_min_ratio_to_activate=p.pan_and_scan_min_ratio)


def _processor_crops(processor, w, h) -> int:
    """`Gemma3ImageProcessorPil.pan_and_scan` on a zero-stride (3, H, W) array: the crops it cuts, no pixels."""
    image = np.broadcast_to(np.zeros((1, 1, 1), dtype=np.uint8), (3, h, w))
    return len(processor.pan_and_scan(image, processor.pan_and_scan_min_crop_size,
                                      processor.pan_and_scan_max_num_crops,
                                      processor.pan_and_scan_min_ratio_to_activate))


def test_gemma3_default_is_one_view():
    for w, h in ((1920, 1080), (10, 10), (896, 896), (100, 3000)):
        got = image_tokens(GEMMA3, w, h)
        assert (got.views, got.vision_patches, got.llm_tokens) == (1, 4096, 256)
        assert (got.resized_width, got.resized_height) == (896, 896)


@settings(max_examples=300, **FAST)
@given(size=extreme)
def test_gemma3_pan_and_scan_equal_processor(gemma3_processor, size):
    w, h = size
    crops = _processor_crops(gemma3_processor, w, h)
    got = image_tokens(GEMMA3_PAN_AND_SCAN, w, h, llamafactory=False)
    assert got.views == 1 + crops
    assert got.vision_patches == (1 + crops) * 4096
    assert got.llm_tokens == (1 + crops) * 256
    assert image_tokens(GEMMA3, w, h, llamafactory=False).views == 1


@settings(max_examples=8, **FAST)
@given(size=st.tuples(st.integers(1, 2400), st.integers(1, 2400)))
def test_gemma3_full_pipeline_on_pixels(gemma3_processor, size):
    """The processor run on a real image gives the rule's number of 896x896 views, with and without pan & scan."""
    from PIL import Image

    w, h = size
    image = Image.new("RGB", (w, h))
    for spec, pan_and_scan in ((GEMMA3, False), (GEMMA3_PAN_AND_SCAN, True)):
        out = gemma3_processor(images=[image], do_pan_and_scan=pan_and_scan, return_tensors="np")
        got = image_tokens(spec, w, h, llamafactory=False)
        assert out["pixel_values"].shape == (got.views, 3, 896, 896)
        assert list(out["num_crops"]) == [got.views - 1]


@pytest.mark.slow
@settings(max_examples=200, **FAST)
@given(size=extreme)
def test_gemma3_llamafactory_path(gemma3_processor, size):
    """Pan & scan runs on the image after LLaMA-Factory's pre-resize."""
    from PIL import Image

    w, h = size
    image = _lf_preresize(Image.new("RGB", (w, h)))
    assert image_tokens(GEMMA3_PAN_AND_SCAN, w, h).views == 1 + _processor_crops(gemma3_processor, image.width,
                                                                                image.height)
