"""Image-token rules of Mllama (Llama 3.2 Vision), Idefics3 / SmolVLM-Instruct and PaliGemma 2 against the installed
transformers image processors (PIL backends), built from the checkpoints' preprocessor_config.json values: hundreds
of random sizes (extreme aspect ratios included) through the processors' own counting helpers, and a handful of full
pixel runs."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vlplan.planner.families.idefics3 import tokens as idefics3_rule
from vlplan.planner.families.mllama import tokens as mllama_rule
from vlplan.planner.registry import resolve
from vlplan.planner.tokens import image_tokens

pytest.importorskip("transformers")

MLLAMA = resolve("llama-3.2-11b-vision")
IDEFICS3 = resolve("idefics3-8b")
SMOLVLM = resolve("smolvlm")
PALIGEMMA = resolve("paligemma2-3b")

sizes = st.tuples(st.integers(1, 6000), st.integers(1, 6000))
extreme = st.one_of(sizes, st.tuples(st.integers(1, 40), st.integers(1, 8000)),
                    st.tuples(st.integers(1, 8000), st.integers(1, 40)))
FIXED = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PIXELS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _tokens(spec, w, h):
    return image_tokens(spec, w, h, image_max_pixels=None, image_min_pixels=None)


def _image(w, h):
    from PIL import Image

    return Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8))


# Mllama -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mllama_processor():
    from transformers import MllamaImageProcessorPil

    p = MLLAMA.processor  # preprocessor_config.json: size 560x560, max_image_tiles 4 (the class default size is 224)
    return MllamaImageProcessorPil(size={"height": p.image_size, "width": p.image_size}, max_image_tiles=p.max_tiles)


@FIXED
@given(size=extreme)
def test_mllama_tiles_equal_processor_canvas(mllama_processor, size):
    from transformers.models.mllama.image_processing_pil_mllama import (
        convert_aspect_ratios_to_ids_np,
        get_optimal_tiled_canvas,
    )

    w, h = size
    p = MLLAMA.processor
    canvas_h, canvas_w = get_optimal_tiled_canvas(h, w, mllama_processor.max_image_tiles, p.image_size)
    got = _tokens(MLLAMA, w, h)
    assert (got.resized_height, got.resized_width) == (canvas_h, canvas_w)
    rows, cols = canvas_h // p.image_size, canvas_w // p.image_size
    assert mllama_rule.tiles(p, w, h) == (rows, cols)
    expected_id = int(convert_aspect_ratios_to_ids_np([[(rows, cols)]], p.max_tiles)[0, 0])
    assert mllama_rule.aspect_ratio_id(p, w, h) == expected_id
    # every one of the 4 tile slots runs through the encoder: 4 x (40*40 + 1 -> padded to 1608)
    assert (got.vision_patches, got.views, got.llm_tokens) == (4 * 1608, 4, 1)


@PIXELS
@given(size=st.tuples(st.integers(1, 2500), st.integers(1, 2500)))
def test_mllama_pixels(mllama_processor, size):
    w, h = size
    out = mllama_processor(images=[[_image(w, h)]], return_tensors="np")
    got = _tokens(MLLAMA, w, h)
    rows, cols = mllama_rule.tiles(MLLAMA.processor, w, h)
    assert out["pixel_values"].shape == (1, 1, 4, 3, 560, 560)  # always max_image_tiles slots
    assert out["num_tiles"] == [[rows * cols]]
    assert int(out["aspect_ratio_ids"][0, 0]) == mllama_rule.aspect_ratio_id(MLLAMA.processor, w, h)
    assert out["aspect_ratio_mask"][0, 0].tolist() == [1] * (rows * cols) + [0] * (4 - rows * cols)
    assert got.views == out["pixel_values"].shape[2]


def test_mllama_worked_examples():
    p = MLLAMA.processor
    assert mllama_rule.tiles(p, 1920, 1080) == (2, 2)
    assert mllama_rule.tiles(p, 640, 480) == (1, 2)
    assert mllama_rule.tiles(p, 1, 1000) == (2, 1)
    assert mllama_rule.tiles(p, 3000, 100) == (1, 4)
    assert mllama_rule.tile_positions(p) == 1608


# Idefics3 / SmolVLM -------------------------------------------------------------------------------------------------


def _idefics3_processor(spec):
    from transformers import Idefics3ImageProcessorPil

    p = spec.processor  # Idefics3-8B: longest_edge 1456, tiles 364; SmolVLM-Instruct: 1536, 384
    return Idefics3ImageProcessorPil(size={"longest_edge": p.longest_edge},
                                     max_image_size={"longest_edge": p.image_size})


@pytest.fixture(scope="module", params=["idefics3-8b", "smolvlm"])
def idefics3_case(request):
    spec = resolve(request.param)
    return spec, _idefics3_processor(spec)


@FIXED
@given(size=extreme)
def test_idefics3_views_equal_processor(idefics3_case, size):
    spec, processor = idefics3_case
    w, h = size
    views, rows, cols = processor.get_number_of_image_patches(h, w)
    views = views or 1  # 0 means "not split": the image is one view
    got = _tokens(spec, w, h)
    p = spec.processor
    assert got.views == views
    assert idefics3_rule.grid(p, w, h)[:2] == (rows, cols)
    assert got.vision_patches == views * (p.image_size // 14) ** 2
    assert got.llm_tokens == views * p.tokens_per_view
    # Idefics3Processor._get_num_multimodal_tokens: rows*(cols*(seq+2)+1) + seq + 3 text tokens per image
    seq = p.tokens_per_view
    assert got.llm_tokens + got.special_tokens == rows * (cols * (seq + 2) + 1) + seq + 3


@PIXELS
@given(size=st.one_of(st.tuples(st.integers(1, 2000), st.integers(1, 2000)),
                      st.tuples(st.integers(1, 20), st.integers(100, 3000))))
def test_idefics3_pixels(idefics3_case, size):
    spec, processor = idefics3_case
    w, h = size
    out = processor(images=[[_image(w, h)]], return_tensors="np", return_row_col_info=True)
    got = _tokens(spec, w, h)
    m = spec.processor.image_size
    assert out["pixel_values"].shape == (1, got.views, 3, m, m)
    assert out["pixel_attention_mask"].shape == (1, got.views, m, m)
    assert (out["rows"][0][0], out["cols"][0][0]) == idefics3_rule.grid(spec.processor, w, h)[:2]


def test_idefics3_tokens_per_view():
    assert IDEFICS3.processor.tokens_per_view == 169  # (364 / 14)**2 / 2**2
    assert SMOLVLM.processor.tokens_per_view == 81  # (384 / 14)**2 / 3**2 = 27**2 / 9


# PaliGemma ----------------------------------------------------------------------------------------------------------


@FIXED
@given(size=extreme)
def test_paligemma_fixed_view(size):
    """SiglipImageProcessor resizes to 448 x 448: 32*32 = 1024 patches (no class token) and image_seq_length 1024."""
    got = _tokens(PALIGEMMA, *size)
    assert (got.vision_patches, got.llm_tokens, got.views) == (1024, 1024, 1)
    assert (got.resized_width, got.resized_height) == (448, 448)


@pytest.mark.parametrize("size", [(1920, 1080), (3, 500), (448, 448)])
def test_paligemma_pixels(size):
    from transformers import SiglipImageProcessorPil

    processor = SiglipImageProcessorPil(size={"height": 448, "width": 448}, image_seq_length=1024)
    out = processor(images=[_image(*size)], return_tensors="np")
    got = _tokens(PALIGEMMA, *size)
    assert out["pixel_values"].shape[-2:] == (got.resized_height, got.resized_width)
    assert (out["pixel_values"].shape[-1] // 14) ** 2 == got.vision_patches == processor.image_seq_length
