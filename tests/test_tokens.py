"""Image-token rules of the Qwen2-VL/2.5-VL and fixed-view (LLaVA-1.5) families against the installed
transformers image processors, on hundreds of random sizes including extreme aspect ratios."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlplan.planner.errors import VlplanError
from vlplan.planner.registry import resolve
from vlplan.planner.tokens import image_tokens, llamafactory_preresize, parse_size, smart_resize

transformers = pytest.importorskip("transformers")

QWEN = resolve("qwen2.5-vl-7b")
LLAVA = resolve("llava-1.5-7b")

sizes = st.tuples(st.integers(1, 6000), st.integers(1, 6000))
extreme = st.one_of(sizes, st.tuples(st.integers(1, 40), st.integers(1, 8000)),
                    st.tuples(st.integers(1, 8000), st.integers(1, 40)))


@pytest.fixture(scope="module")
def qwen_processor():
    from transformers import Qwen2VLImageProcessorPil

    p = QWEN.processor  # the checkpoint's preprocessor_config.json values, not the class defaults
    return Qwen2VLImageProcessorPil(min_pixels=p.min_pixels, max_pixels=p.max_pixels, patch_size=p.patch_size,
                                    merge_size=p.merge_size, temporal_patch_size=2)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=extreme)
def test_qwen_patches_equal_processor(qwen_processor, size):
    w, h = size
    if max(w, h) / min(w, h) > 200:
        with pytest.raises(ValueError):
            qwen_processor.get_number_of_image_patches(h, w)
        with pytest.raises(VlplanError):
            image_tokens(QWEN, w, h, llamafactory=False)
        return
    expected = qwen_processor.get_number_of_image_patches(h, w)
    got = image_tokens(QWEN, w, h, llamafactory=False)
    assert got.vision_patches == expected
    assert got.llm_tokens == expected // 4


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.tuples(st.integers(28, 1400), st.integers(28, 1400)))
def test_qwen_full_pipeline_on_pixels(qwen_processor, size):
    """The processor run on a real image (resize + patchify) gives the grid the rule predicts."""
    from PIL import Image

    w, h = size
    image = Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8))
    out = qwen_processor(images=[image], return_tensors="np")
    t, gh, gw = out["image_grid_thw"][0]
    got = image_tokens(QWEN, w, h, llamafactory=False)
    assert (gh * 14, gw * 14) == (got.resized_height, got.resized_width)
    assert out["pixel_values"].shape[0] == got.vision_patches


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=extreme)
def test_qwen_llamafactory_path(qwen_processor, size):
    """LLaMA-Factory's path: its pre-resize (with PIL, as mm_plugin does) and Qwen2VLPlugin's min-side / aspect
    fixes, then the processor: the rule gives the processor's count for the image LLaMA-Factory would hand it."""
    from PIL import Image

    w, h = size
    image = Image.new("RGB", (w, h))
    if w * h > 768 * 768:  # mm_plugin._preprocess_image
        factor = (768 * 768 / (w * h)) ** 0.5
        image = image.resize((int(w * factor), int(h * factor)))
    if image.width * image.height < 32 * 32:
        factor = (32 * 32 / (image.width * image.height)) ** 0.5
        image = image.resize((int(image.width * factor), int(image.height * factor)))
    if min(image.width, image.height) < 28:  # Qwen2VLPlugin._preprocess_image
        image = image.resize((max(image.width, 28), max(image.height, 28)))
    if image.width / image.height > 200:
        image = image.resize((image.height * 180, image.height))
    if image.height / image.width > 200:
        image = image.resize((image.width, image.width * 180))
    expected = qwen_processor.get_number_of_image_patches(image.height, image.width)
    assert image_tokens(QWEN, w, h).vision_patches == expected


def test_llamafactory_preresize_examples():
    # LLaMA-Factory mm_plugin `_preprocess_image`: int() truncation after scaling by sqrt(max / (w*h))
    assert llamafactory_preresize(1920, 1080, 768 * 768, 32 * 32) == (1024, 576)
    assert llamafactory_preresize(768, 768, 768 * 768, 32 * 32) == (768, 768)
    assert llamafactory_preresize(10, 10, 768 * 768, 32 * 32) == (32, 32)
    # a 1920x1080 image under LLaMA-Factory's default cap: 1024x576 -> 1036x588 -> 37x21 merged tokens
    tokens = image_tokens(QWEN, 1920, 1080)
    assert (tokens.resized_width, tokens.resized_height, tokens.llm_tokens) == (1036, 588, 777)
    assert image_tokens(QWEN, 768, 768).llm_tokens == 729


@settings(max_examples=200, deadline=None)
@given(size=sizes)
def test_llava_fixed_view(size):
    """LLaVA-1.5 (CLIPImageProcessor: resize shortest edge to 336, center crop 336): 576 tokens, 577 patches."""
    got = image_tokens(LLAVA, *size)
    assert (got.llm_tokens, got.vision_patches, got.resized_width, got.resized_height) == (576, 577, 336, 336)


def test_llava_processor_counts_576():
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    from PIL import Image

    out = processor(images=[Image.fromarray(np.zeros((500, 1300, 3), dtype=np.uint8))], return_tensors="np")
    assert out["pixel_values"].shape[-2:] == (336, 336)
    assert (336 // 14) ** 2 == image_tokens(LLAVA, 1300, 500).llm_tokens


@pytest.mark.parametrize("text,expected", [("1920x1080", (1920, 1080)), ("768", (768, 768)), ("640X480", (640, 480))])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["axb", "0x10", "10x-1", "1x2x3", ""])
def test_parse_size_rejects(text):
    with pytest.raises(VlplanError, match="WIDTHxHEIGHT|positive"):
        parse_size(text)


def test_smart_resize_rejects_aspect_ratio_above_200():
    with pytest.raises(VlplanError, match="aspect ratio"):
        smart_resize(10, 3000, 28, 3136, 12845056)
