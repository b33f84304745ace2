"""Image-token rule of Qwen3-VL and Qwen3-VL-MoE ("qwen_smart_resize" with patch 16, merge 2: factor 32) against the
installed transformers processor. transformers 5.23 has no Qwen3-VL image processor class: `qwen3_vl` and
`qwen3_vl_moe` map to Qwen2VLImageProcessor(Pil), built here with the checkpoints' preprocessor_config.json values
(size {shortest_edge 65536, longest_edge 16777216}, patch 16, merge 2, temporal 2), not the class defaults
(patch 14)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlplan.planner.errors import VlplanError
from vlplan.planner.registry import all_specs, resolve
from vlplan.planner.tokens import image_tokens

transformers = pytest.importorskip("transformers")

QWEN3 = resolve("qwen3-vl-8b")
FAMILIES = ("qwen3_vl", "qwen3_vl_moe")

sizes = st.tuples(st.integers(1, 8000), st.integers(1, 8000))
extreme = st.one_of(sizes, st.tuples(st.integers(1, 40), st.integers(1, 9000)),
                    st.tuples(st.integers(1, 9000), st.integers(1, 40)))


@pytest.fixture(scope="module")
def processor():
    from transformers import Qwen2VLImageProcessorPil

    p = QWEN3.processor
    return Qwen2VLImageProcessorPil(size={"shortest_edge": p.min_pixels, "longest_edge": p.max_pixels},
                                    patch_size=p.patch_size, merge_size=p.merge_size, temporal_patch_size=2)


def test_every_qwen3_vl_entry_uses_the_checkpoint_processor_values():
    """Dense and MoE checkpoints ship the same preprocessor_config.json: factor 32, 64 to 16384 merged tokens."""
    entries = [spec for spec in all_specs() if spec.family in FAMILIES]
    assert {spec.name for spec in entries} >= {"qwen3-vl-4b", "qwen3-vl-8b", "qwen3-vl-32b", "qwen3-vl-30b-a3b"}
    for spec in entries:
        p = spec.processor
        assert (p.rule, p.patch_size, p.merge_size) == ("qwen_smart_resize", 16, 2)
        assert (p.min_pixels, p.max_pixels, p.special_tokens_per_image) == (65536, 16777216, 2)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=extreme)
def test_patches_equal_processor(processor, size):
    """The processor's own count (get_number_of_image_patches: smart_resize, then the patch grid) on raw sizes, both
    resize branches (below 65536 and above 16777216 pixels) and the aspect-ratio refusal included."""
    w, h = size
    if max(w, h) / min(w, h) > 200:
        with pytest.raises(ValueError):
            processor.get_number_of_image_patches(h, w)
        with pytest.raises(VlplanError):
            image_tokens(QWEN3, w, h, llamafactory=False)
        return
    expected = processor.get_number_of_image_patches(h, w)
    got = image_tokens(QWEN3, w, h, llamafactory=False)
    assert got.vision_patches == expected
    assert got.llm_tokens == expected // 4  # Qwen3VLProcessor: grid_thw.prod() // merge_size**2 placeholders
    assert got.resized_width % 32 == 0 and got.resized_height % 32 == 0
    assert (got.special_tokens, got.views) == (2, 1)  # <|vision_start|> ... <|vision_end|>; DeepStack adds none


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.tuples(st.integers(16, 1200), st.integers(16, 1200)))
def test_full_pipeline_on_pixels(processor, size):
    """The processor run on a real image (resize + patchify): the grid, the patch rows and their width."""
    from PIL import Image

    w, h = size
    out = processor(images=[Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8))], return_tensors="np")
    t, gh, gw = out["image_grid_thw"][0]
    got = image_tokens(QWEN3, w, h, llamafactory=False)
    assert (t, gh * 16, gw * 16) == (1, got.resized_height, got.resized_width)
    assert out["pixel_values"].shape == (got.vision_patches, 3 * 2 * 16 * 16)


@pytest.mark.slow
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=extreme)
def test_llamafactory_path(processor, size):
    """LLaMA-Factory's path (Qwen3VLPlugin inherits Qwen2VLPlugin._preprocess_image): its pre-resize to
    image_max_pixels 768*768 / image_min_pixels 32*32 with PIL, the min-side 28 and 180:1 aspect fixes, then the
    processor on the image it hands over."""
    from PIL import Image

    w, h = size
    image = Image.new("RGB", (w, h))
    if w * h > 768 * 768:
        factor = (768 * 768 / (w * h)) ** 0.5
        image = image.resize((int(w * factor), int(h * factor)))
    if image.width * image.height < 32 * 32:
        factor = (32 * 32 / (image.width * image.height)) ** 0.5
        image = image.resize((int(image.width * factor), int(image.height * factor)))
    if min(image.width, image.height) < 28:
        image = image.resize((max(image.width, 28), max(image.height, 28)))
    if image.width / image.height > 200:
        image = image.resize((image.height * 180, image.height))
    if image.height / image.width > 200:
        image = image.resize((image.width, image.width * 180))
    expected = processor.get_number_of_image_patches(image.height, image.width)
    got = image_tokens(QWEN3, w, h)
    assert got.vision_patches == expected
    assert got.llm_tokens == expected // 4


@pytest.mark.parametrize("name", ["qwen3-vl-4b", "qwen3-vl-30b-a3b"])
@pytest.mark.parametrize("size,patches", [
    ((512, 512), 1024),  # 512 = 16 * 32: no resize
    ((640, 480), 1200),  # 640x480 (round(15) x round(20) of 32)
    ((100, 100), 256),  # below shortest_edge 65536 pixels: scaled up to 256x256
    ((1920, 1080), 2304),  # LLaMA-Factory's 768*768 cap: 1024x576, already a multiple of 32
])
def test_examples(name, size, patches):
    got = image_tokens(resolve(name), *size)
    assert (got.vision_patches, got.llm_tokens) == (patches, patches // 4)
