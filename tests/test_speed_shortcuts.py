"""The exact shortcuts of `step.simulate_extrapolated` against the full simulation, for every registry model.

Each shortcut rests on an assumption about the simulated step; a family that breaks one must say so in its activation
model (`BaseModel.frozen_vision_layers_add_weights_only`, `BaseModel.text_layer_delta_shared`, the fp16 exception in
`step.simulation_key`), and these tests find the families that break one by comparing, not by a list of names: where
a family claims an assumption the shortcut must equal the full simulation, and where it declines one the full
simulation must show why (the shortcut would be wrong), so no claim is stale either way.
"""

from contextlib import contextmanager

import pytest

from vlplan.planner.errors import VlplanError
from vlplan.planner.hardware import find_gpu
from vlplan.planner.memory import step
from vlplan.planner.memory.families import model_for
from vlplan.planner.memory.sim import recording_allocations
from vlplan.planner.registry import names, resolve
from vlplan.planner.setup import make_setup
from vlplan.planner.video import Video

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _no_persistent_cache(monkeypatch):
    """Every result here is computed: one read back from the persistent cache would skip the shortcut under test."""
    monkeypatch.setenv("VLPLAN_NO_CACHE", "1")

MODELS = names()
V100 = find_gpu("v100-32g")
VIDEO = dict(method="lora", videos=(Video(640, 360, duration_s=4.0),), seq_len=16384)  # Qwen2-VL/2.5-VL only
PACKED = dict(method="full", packing=True, batch_size=2)
OFT = dict(method="oft", stack="llamafactory")  # peft's OFT rotation on every language-model linear
METHODS = [dict(method="full"), dict(method="freeze"), dict(method="lora"), dict(method="qlora", quant_bits=4),
           dict(method="qlora", quant_bits=8), dict(method="lora", stack="llamafactory", attn="eager"),
           dict(method="full", stack="hf-trainer", optimizer="adafactor"),
           dict(method="lora", liger_kernel=True, offload_checkpoints=True, stack="llamafactory"), VIDEO, PACKED, OFT]


def _setup(model: str, **kw):
    kw.setdefault("seq_len", 8192)
    kw.setdefault("image_size", (448, 448))
    try:
        setup = make_setup(resolve(model), **kw)  # extra TrainSetup fields (videos, packing) pass through **settings
        model_for(setup.model.family).check_setup(setup)  # what the family cannot train (BaseModel.check_setup)
        return setup
    except VlplanError:  # e.g. a processor with a fixed tile grid that the sequence cannot hold: no such case
        return None


def _result(result) -> tuple:
    return result.phase_peaks, result.phase_breakdown, result.segments, result.host_peak_bytes


def _full(setup) -> tuple:
    with step.full_simulation():
        return _result(step.simulate_extrapolated(setup))


def _shortcut(*setups) -> tuple:
    """The last setup's result with the shortcuts on, after the earlier ones (whose shared results it may reuse)."""
    step.clear_memos()
    try:
        for setup in setups:
            result = step.simulate_extrapolated(setup)
        return _result(result)
    finally:
        step.clear_memos()


@contextmanager
def claimed(builder, **attributes):
    """The activation model claiming the assumptions it declines, to show that the shortcut would then be wrong."""
    saved = {name: builder.__dict__.get(name) for name in attributes}
    for name, value in attributes.items():
        setattr(builder, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                delattr(builder, name)
            else:
                setattr(builder, name, value)


def _allocation_sizes(setup) -> list[list[int]]:
    """The allocation sequence at the base layer counts, as sizes in order (storage ids renumbered by first use): what
    the caching-allocator replay reads."""
    from vlplan.planner.memory.families import base_layer_counts, layer_counts

    base = base_layer_counts(setup, layer_counts(setup.model), step.BASE_LAYERS)
    with recording_allocations() as logs:
        step.simulate(setup, base)
    live: dict = {}  # storage ids are reused once freed: number each allocation, and its free by it
    sizes = []
    for key, size in logs[0]:
        if size:
            live[key] = len(sizes)
            sizes.append([live[key], size])
        else:
            sizes.append([live.pop(key), 0])
    return sizes


@pytest.mark.parametrize("model", MODELS)
def test_fp16_shares_the_bf16_simulation_where_the_keys_are_equal(model):
    """An fp16 GPU (V100) gets the simulation of the bf16 setup when the keys say so: then the full fp16 simulation
    (peaks, breakdowns, every segment, and the allocation sequence the reserved-memory replay reads) equals the bf16
    one."""
    for kw in METHODS:
        bf16 = _setup(model, **kw)
        fp16 = _setup(model, gpu=V100, precision="fp16", **kw)
        if bf16 is None or fp16 is None:
            continue
        if step.simulation_key(fp16) == step.simulation_key(bf16):
            assert _full(fp16) == _full(bf16), kw
            with step.full_simulation():
                assert _allocation_sizes(fp16) == _allocation_sizes(bf16), kw


def test_fp16_exception_is_real():
    """8-bit QLoRA keeps its own fp16 simulation: bitsandbytes casts the matmul input to fp16, a copy under bf16 and
    none under fp16, so the two differ."""
    kw = dict(method="qlora", quant_bits=8)
    bf16, fp16 = _setup("qwen2.5-vl-7b", **kw), _setup("qwen2.5-vl-7b", gpu=V100, precision="fp16", **kw)
    assert bf16 is not None and fp16 is not None
    assert step.simulation_key(fp16) != step.simulation_key(bf16)
    assert _full(fp16) != _full(bf16)


VISION_CASES = (dict(method="lora"), dict(method="full", batch_size=2), dict(method="qlora", quant_bits=4),
                dict(method="lora", stack="llamafactory", num_images=2, seq_len=16384),
                dict(method="full", stack="hf-trainer", attn="eager", seq_len=4096),
                dict(method="lora", liger_kernel=True, offload_checkpoints=True, stack="llamafactory"), VIDEO, PACKED,
                OFT)
TEXT_SIZES = [(224, 224), (448, 448), (768, 768), (1920, 1080)]
TEXT_CASES = (dict(method="lora"), dict(method="lora", seq_len=4096), dict(method="freeze"),
              dict(method="full", batch_size=2), dict(method="lora", stack="llamafactory", num_images=2, seq_len=16384),
              dict(method="full", liger_kernel=True, offload_checkpoints=True, stack="llamafactory"), VIDEO, PACKED,
              OFT)


def _vision_shortcut_wrong(model: str, kw: dict) -> bool:
    setup = _setup(model, **kw)
    return setup is not None and _shortcut(setup) != _full(setup)


def _text_shortcut_wrong(model: str, kw: dict) -> bool:
    """Whether a setup gets a wrong result from the difference of the first or second size's simulation."""
    setups = [setup for setup in (_setup(model, image_size=size, **kw) for size in TEXT_SIZES) if setup is not None]
    full = [_full(setup) for setup in setups]
    return any(_shortcut(setups[first], setups[i]) != full[i] for first in (0, 1) for i in range(len(setups))
               if i != first)


@pytest.mark.parametrize("model", MODELS)
def test_frozen_vision_layer_adds_only_its_weights(model):
    """The frozen-vision-layer shortcut equals the full simulation for every model whose family claims it."""
    if not model_for(resolve(model).family).frozen_vision_layers_add_weights_only:
        pytest.skip("the family declines the shortcut (test_declined_shortcuts_are_wrong)")
    for kw in VISION_CASES:
        assert not _vision_shortcut_wrong(model, kw), kw


@pytest.mark.parametrize("model", MODELS)
def test_text_layer_difference_is_shared_across_image_sizes(model):
    """A setup whose language-model-layer difference comes from another image size's simulation equals its full
    simulation, for every model whose family claims it (`text_layer_delta_shared`)."""
    spec = resolve(model)
    if not model_for(spec.family).text_layer_delta_shared(spec):
        pytest.skip("the family declines the shortcut (test_declined_shortcuts_are_wrong)")
    for kw in TEXT_CASES:
        assert not _text_shortcut_wrong(model, kw), kw


def _declining(claim: str) -> dict:
    """{activation model class: [registry models it declines `claim` for]}."""
    declined: dict = {}
    for model in MODELS:
        spec = resolve(model)
        builder = model_for(spec.family)
        holds = builder.frozen_vision_layers_add_weights_only if claim == "vision" else \
            builder.text_layer_delta_shared(spec)
        if not holds:
            declined.setdefault(builder, []).append(model)
    return declined


@pytest.mark.parametrize("claim", ["vision", "text"])
def test_declined_shortcuts_are_wrong(claim):
    """Each activation model that declines a shortcut has a registry model and a setup where taking it anyway gives a
    wrong answer: no family declines a shortcut that holds for it."""
    declined = _declining(claim)
    assert declined
    for builder, models in declined.items():
        attribute = "frozen_vision_layers_add_weights_only" if claim == "vision" else "text_layer_delta_shared"
        value = True if claim == "vision" else classmethod(lambda cls, spec: True)
        with claimed(builder, **{attribute: value}):
            wrong = any(_vision_shortcut_wrong(model, kw) if claim == "vision" else _text_shortcut_wrong(model, kw)
                        for model in models for kw in (VISION_CASES if claim == "vision" else TEXT_CASES))
        assert wrong, f"{builder.__name__} declines the {claim} shortcut for {models}, but it holds in every case"


def test_cases_are_valid_setups():
    """Every case above is a valid setup for Qwen2.5-VL-7B (a case no model accepts would test nothing)."""
    for kw in METHODS + list(VISION_CASES) + list(TEXT_CASES):
        assert _setup("qwen2.5-vl-7b", **kw) is not None, kw
        assert _setup("qwen2.5-vl-7b", gpu=V100, precision="fp16", **kw) is not None or "quant_bits" in kw, kw
