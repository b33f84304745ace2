"""Image-token rules of LLaVA-NeXT (anyres tiles) and Pixtral (native resolution) against the installed transformers
processors: their own counting helpers on hundreds of random sizes (extreme aspect ratios included), plus a few full
pixel runs. The processors are built from the checkpoints' preprocessor/processor config values."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlplan.planner.errors import VlplanError
from vlplan.planner.registry import resolve
from vlplan.planner.tokens import image_tokens, llamafactory_preresize

transformers = pytest.importorskip("transformers")

LLAVA_NEXT = resolve("llava-v1.6-mistral-7b")
PIXTRAL = resolve("pixtral-12b")

sizes = st.tuples(st.integers(1, 6000), st.integers(1, 6000))
extreme = st.one_of(sizes, st.tuples(st.integers(1, 40), st.integers(1, 8000)),
                    st.tuples(st.integers(1, 8000), st.integers(1, 40)))


# LLaVA-NeXT ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava_next_processor():
    """LlavaNextImageProcessorPil with llava-v1.6's preprocessor_config.json, and the LlavaNextProcessor counting
    method on a tokenizer-free instance with its processor_config.json values (patch 14, 1 extra token, "default")."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    p = LLAVA_NEXT.processor
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": p.image_size}, crop_size={"height": p.image_size, "width": p.image_size},
        image_grid_pinpoints=[list(pinpoint) for pinpoint in p.pinpoints])
    processor = object.__new__(LlavaNextProcessor)
    processor.image_processor = image_processor
    processor.patch_size = p.patch_size
    processor.num_additional_image_tokens = 1
    processor.vision_feature_select_strategy = "default"
    return processor


def _llava_next_expected(processor, width, height):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    size = LLAVA_NEXT.processor.image_size
    tokens = processor._get_number_of_features(height, width, size, size) - 1  # "default": CLS dropped
    views = image_size_to_num_patches((height, width), processor.image_processor.image_grid_pinpoints, size)
    return tokens, views


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=extreme)
def test_llava_next_tokens_equal_processor(llava_next_processor, size):
    w, h = size
    tokens, views = _llava_next_expected(llava_next_processor, w, h)
    got = image_tokens(LLAVA_NEXT, w, h, llamafactory=False)
    assert got.llm_tokens == tokens
    assert got.views == views
    assert got.vision_patches == views * 577  # CLIP ViT-L/14-336: 576 patches + CLS per view


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=extreme)
def test_llava_next_llamafactory_path(llava_next_processor, size):
    """LLaMA-Factory's LlavaNextPlugin counts with the same processor method on the pre-resized image."""
    w, h = llamafactory_preresize(*size, 768 * 768, 32 * 32)
    tokens, views = _llava_next_expected(llava_next_processor, w, h)
    got = image_tokens(LLAVA_NEXT, *size)
    assert (got.llm_tokens, got.views) == (tokens, views)


@pytest.mark.parametrize("size", [(1024, 768), (448, 448), (1920, 1080), (100, 900), (13, 7)])
def test_llava_next_pixels(llava_next_processor, size):
    """The processor run on a real image gives the views (pixel_values dim 1) the rule predicts."""
    from PIL import Image

    w, h = size
    out = llava_next_processor.image_processor(images=[Image.new("RGB", (w, h))], return_tensors="np")
    got = image_tokens(LLAVA_NEXT, w, h, llamafactory=False)
    assert out["pixel_values"].shape[1:] == (got.views, 3, 336, 336)
    assert list(out["image_sizes"][0]) == [h, w]


def test_llava_next_worked_examples():
    """tokens_research.md §3 examples."""
    expected = {(1920, 1080): (1948, 5), (1080, 1920): (1968, 5), (1024, 1024): (2928, 5), (640, 480): (2340, 5),
                (10, 10): (1176, 3), (3000, 100): (722, 4)}
    for (w, h), (tokens, views) in expected.items():
        got = image_tokens(LLAVA_NEXT, w, h, llamafactory=False)
        assert (got.llm_tokens, got.views) == (tokens, views)


# Pixtral ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pixtral_processor():
    from transformers import PixtralImageProcessorPil

    p = PIXTRAL.processor
    return PixtralImageProcessorPil(size={"longest_edge": p.longest_edge},
                                    patch_size={"height": p.patch_size, "width": p.patch_size})


def _pixtral_expected(width, height):
    """`get_resize_output_image_size` reads only the image's shape: a broadcast view stands in for the pixels."""
    from transformers.image_utils import ChannelDimension
    from transformers.models.pixtral.image_processing_pil_pixtral import get_resize_output_image_size

    p = PIXTRAL.processor
    image = np.broadcast_to(np.zeros((1, 1, 3), dtype=np.uint8), (height, width, 3))
    return get_resize_output_image_size(image, size=(p.longest_edge, p.longest_edge),
                                        patch_size=(p.patch_size, p.patch_size),
                                        input_data_format=ChannelDimension.LAST)


@settings(max_examples=300, deadline=None)
@given(size=extreme)
def test_pixtral_tokens_equal_processor(size):
    w, h = size
    rh, rw = _pixtral_expected(w, h)
    if rh == 0 or rw == 0:  # the pixel path raises on a 0-sized resize target (test_pixtral_pixels)
        with pytest.raises(VlplanError):
            image_tokens(PIXTRAL, w, h, llamafactory=False)
        return
    got = image_tokens(PIXTRAL, w, h, llamafactory=False)
    rows, columns = rh // 16, rw // 16
    assert (got.resized_width, got.resized_height) == (rw, rh)
    assert got.vision_patches == rows * columns
    assert got.llm_tokens == rows * columns  # [IMG]
    assert got.special_tokens == rows  # [IMG_BREAK] per row, the last one [IMG_END]


@pytest.mark.parametrize("size", [(512, 512), (1024, 768), (1920, 1080), (37, 1500), (5, 5)])
def test_pixtral_pixels(pixtral_processor, size):
    from PIL import Image

    w, h = size
    out = pixtral_processor(images=[Image.new("RGB", (w, h))], return_tensors="np")
    got = image_tokens(PIXTRAL, w, h, llamafactory=False)
    assert list(out["image_sizes"][0]) == [got.resized_height, got.resized_width]
    assert out["pixel_values"].shape[-2:] == (got.resized_height, got.resized_width)


def test_pixtral_zero_side_raises(pixtral_processor):
    from PIL import Image

    with pytest.raises(ValueError):
        pixtral_processor(images=[Image.new("RGB", (1226, 1))], return_tensors="np")
    with pytest.raises(VlplanError, match="0 px"):
        image_tokens(PIXTRAL, 1226, 1, llamafactory=False)


def test_pixtral_worked_examples():
    """tokens_research.md §12: [IMG] + [IMG_BREAK]/[IMG_END] per image (HF path, then LLaMA-Factory's)."""
    for (w, h), total in {(1920, 1080): 2340, (1080, 1920): 2368, (640, 480): 1230, (3000, 100): 195}.items():
        got = image_tokens(PIXTRAL, w, h, llamafactory=False)
        assert got.llm_tokens + got.special_tokens == total
    got = image_tokens(PIXTRAL, 1024, 1024)
    assert got.llm_tokens + got.special_tokens == 2352
