"""MiniCPM-V 2.6 and Phi-3.5-vision: remote-code families with no transformers class, so neither processor nor model
can run here. Their token rules are held to examples computed by hand from the remote image processors
(image_processing_minicpmv.py, image_processing_phi3_v.py); their activation models (analytic, not trace-validated)
must run for every method and hold exactly the parameters of the module inventory."""

import pytest
from vlplan.planner.errors import VlplanError
from vlplan.planner.families.minicpmv import tokens as minicpm_rule
from vlplan.planner.families.phi3_v import tokens as phi3v_rule
from vlplan.planner.memory.families import model_for
from vlplan.planner.memory.sim import DTYPE_BYTES, Engine
from vlplan.planner.memory.step import simulate
from vlplan.planner.modules import param_counts
from vlplan.planner.registry import resolve
from vlplan.planner.setup import make_setup
from vlplan.planner.tokens import image_tokens

MINICPM = resolve("minicpm-v-2.6")
PHI3V = resolve("phi-3.5-vision")


def _hf(spec, w, h):
    return image_tokens(spec, w, h, image_max_pixels=None, image_min_pixels=None)


# MiniCPM-V token rule -----------------------------------------------------------------------------------------------


def test_minicpmv_1920x1080_is_a_4x2_grid_plus_source():
    """multiple = min(ceil(1920*1080 / 448**2) = 11, 9) = 9; candidates 8 and 9 (10 > max_slice_nums); of their
    grids, cols x rows = 4 x 2 is closest to log(1920/1080): 8 slices + the source view."""
    p = MINICPM.processor
    assert minicpm_rule.sliced_grid(p, 1920, 1080) == (4, 2)
    got = _hf(MINICPM, 1920, 1080)
    assert (got.views, got.llm_tokens) == (9, 9 * 64)
    # <image></image>, <slice></slice> x 8, one newline between the two slice rows, <image_id>0</image_id>
    assert got.special_tokens == 2 + 16 + 1 + 3
    assert got.llm_tokens + got.special_tokens == 598


def test_minicpmv_views_and_patches_by_hand():
    p = MINICPM.processor
    # source view: find_best_resize(1920x1080, 448): h = int(448 / sqrt(16/9)) = 336, w = int(336 * 16/9) = 597
    # -> multiples of 14: 602 x 336; slices: refine 1920 x 1080 to (1920, 1080) -> 480 x 540 per slice, upscaled to
    # area 448**2: h = int(448 / sqrt(480/540)) = 475, w = int(475 * 480/540) = 422 -> 420 x 476
    assert minicpm_rule.view_sizes(p, 1920, 1080) == [(602, 336)] + [(420, 476)] * 8
    got = _hf(MINICPM, 1920, 1080)
    longest = max(43 * 24, 30 * 34)  # (602/14)(336/14) = 1032, (420/14)(476/14) = 1020
    assert got.vision_patches == 9 * longest  # every view padded to the longest one
    assert (got.resized_width, got.resized_height) == (602, 336)


@pytest.mark.parametrize("size, views, total", [
    ((448, 448), 1, 64 + 5),  # no slicing: one upscaled view, <image>, </image> and the image id tag
    ((10, 10), 1, 64 + 5),
    ((1024, 1024), 7, 7 * 64 + 2 + 12 + 1 + 3),  # 6 slices (3 x 2), one row break
    ((640, 480), 3, 3 * 64 + 2 + 4 + 0 + 3),  # 2 slices (2 x 1)
])
def test_minicpmv_examples(size, views, total):
    got = _hf(MINICPM, *size)
    assert got.views == views
    assert got.llm_tokens + got.special_tokens == total


def test_minicpmv_under_llamafactory_preresize():
    """LLaMA-Factory caps images at 768*768 px first: 1920x1080 -> 1024x576, ceil(589824 / 200704) = 3 -> 2 x 1
    slices plus the source view."""
    got = image_tokens(MINICPM, 1920, 1080)
    assert (got.views, got.llm_tokens + got.special_tokens) == (3, 201)


# Phi-3.5-vision token rule ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, hd, tokens", [
    # 1920x1080: ratio 1.78, scale 2 (2 * ceil(2 / 1.78) = 4 <= 4), 672 x int(672/1.78) = 378 -> padded to 672:
    # 2 x 2 crops; (4 + 1) * 144 + 1 + (2 + 1) * 12 = 757
    ((1920, 1080), (672, 672), 757),
    # 3000x100: ratio 30, scale 4, 1344 x 44 -> padded to 336: 1 x 4 crops; 5 * 144 + 1 + 2 * 12 = 745
    ((3000, 100), (1344, 336), 745),
    # 1x1000 is transposed first: 1000 x 1 -> 1344 x 1 -> 1344 x 336, transposed back to 336 x 1344
    ((1, 1000), (336, 1344), 781),
    # small images are upscaled: 448x448 -> scale 2 -> 672 x 672
    ((448, 448), (672, 672), 757),
])
def test_phi3v_crops_by_hand(size, hd, tokens):
    got = _hf(PHI3V, *size)
    assert (got.resized_width, got.resized_height) == hd
    assert got.llm_tokens == tokens
    # pixel_values is padded to num_crops + 1 = 5 views, all through CLIP: 5 x (24*24 + 1)
    assert (got.vision_patches, got.views, got.special_tokens) == (5 * 577, 5, 0)


def test_phi3v_rejects_images_that_resize_to_nothing():
    with pytest.raises(VlplanError, match="too elongated"):
        _hf(PHI3V, 1, 2000)


def test_phi3v_hd_size_matches_num_crops_16_example():
    """Phi-3-vision's num_crops 16: a 448x448 image becomes 4 x 4 crops (1344 x 1344): 17 * 144 + 1 + 5 * 12."""
    from dataclasses import replace

    p = replace(PHI3V.processor, max_tiles=16)
    assert phi3v_rule.hd_size(p, 448, 448) == (1344, 1344)
    assert phi3v_rule.RULES["phi3v_crops"](p, 448, 448)[3] == 17 * 144 + 1 + 5 * 12


# Analytic activation models ------------------------------------------------------------------------------------------

METHODS = [dict(method="lora"), dict(method="full"), dict(method="qlora"),
           dict(method="full", train_vision=True, train_projector=True, gradient_checkpointing=False),
           dict(method="lora", images=[(1920, 1080), (448, 300)], seq_len=4096, attn="fa2")]
# buffers of the remote models (not parameters): RoPE inv_freq/original_inv_freq (head_dim / 2 fp32 each), the
# resampler's 70 x 70 sin-cos table (MiniCPM-V, in the model dtype), CLIP's position_ids (Phi-3.5, 577 int64)
BUFFERS = {"minicpm-v-2.6": {"language.rotary_emb.inv_freq", "language.rotary_emb.original_inv_freq",
                             "resampler.pos_embed"},
           "phi-3.5-vision": {"language.rotary_emb.inv_freq", "language.rotary_emb.original_inv_freq",
                              "vision.position_ids"}}
QUANT_STATE = (".absmax", ".nested_absmax", ".code", ".nested_code")


@pytest.mark.parametrize("name", ["minicpm-v-2.6", "phi-3.5-vision"])
@pytest.mark.parametrize("kwargs", METHODS, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_analytic_model_runs_and_holds_the_inventory(name, kwargs):
    spec = resolve(name)
    setup = make_setup(spec, **kwargs)
    result = simulate(setup)
    assert set(result.phase_peaks) == {"forward", "loss", "backward", "optimizer"}

    engine = Engine()
    model_for(spec.family)(engine, setup, None)
    weights = [p for p in engine.params if p.tensor.storage.category.startswith("weights/")
               and p.name not in BUFFERS[name] and not p.name.endswith(QUANT_STATE)]
    adapters = [p for p in engine.params if p.tensor.storage.category.startswith("adapters/")]
    quantized = setup.method == "qlora"
    # a 4-bit weight packs two parameters per byte
    count = sum(p.numel * (2 if quantized and p.dtype == "uint8" else 1) for p in weights)
    assert count == param_counts(spec)["total"]
    for p in weights:
        if p.trainable:
            assert p.dtype == "fp32"  # LLaMA-Factory upcasts trainable parameters
        elif not (quantized and p.dtype == "uint8"):
            assert p.dtype == "bf16"
    assert bool(adapters) == (setup.method in ("lora", "qlora"))
    expected_bytes = sum(p.numel * DTYPE_BYTES[p.dtype] for p in weights)
    trainable = sum(p.numel for p in weights if p.trainable)
    frozen = sum(p.numel for p in weights if not p.trainable and p.dtype == "bf16")
    packed = sum(p.numel for p in weights if p.dtype == "uint8")
    assert expected_bytes == 4 * trainable + 2 * frozen + packed
    # the weights alone never exceed a phase's peak, and the optimizer phase holds AdamW's two moments
    assert min(result.phase_peaks.values()) > expected_bytes
    if trainable:
        assert result.phase_peaks["optimizer"] > expected_bytes + 8 * trainable


def test_minicpmv_pads_views_to_the_longest():
    """The vision tower runs every view of the batch padded to the longest one (pad_sequence), with a padding mask
    once the views differ in length."""
    from vlplan.planner.families.minicpmv.memory import MiniCPMVModel, view_patches

    setup = make_setup(MINICPM, images=[(1920, 1080), (448, 448)], seq_len=4096)
    # LLaMA-Factory pre-resize: 1920x1080 -> 1024x576 -> a 602x336 source view (43 x 24 patches) and two 420x476
    # slices (30 x 34); 448x448 -> one 448x448 view (32 x 32)
    assert view_patches(setup) == [1032, 1020, 1020, 1024]
    model = MiniCPMVModel(Engine(), setup, None)
    assert (model.views, model.length, model.padded) == (4, 1032, True)
