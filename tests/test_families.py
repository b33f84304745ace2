"""Family conformance: every registered family (planner/families/__init__.py) runs through all of its parts.

For each transformers model_type of the registry, on its first registry entry: the parts the record names exist and
serve that model_type (config.py also says where each component lives in the transformers model) -> spec -> config.json -> spec round trip (through transformers' own config class where the
family is in transformers) -> the token rule against the transformers image processor (where one exists offline)
-> the memory model estimates a step -> the synthetic batch holds as many image tokens as the rule says -> the model
builds (the shrunk transformers model on the meta device, parameter for parameter what the planner counts; and the
family's tiny model spec where it has one). A new family that skips a part, or whose parts disagree, fails here.
"""

import importlib
from dataclasses import replace

import pytest

from vlplan.planner.families import FAMILIES, MODEL_TYPES, PARTS, TORCH_PARTS, family_of, part, token_rules
from vlplan.planner.hf_config import spec_from_hf_config, spec_to_hf_config
from vlplan.planner.memory.estimate import estimate
from vlplan.planner.memory.families import base_layer_counts, layer_counts, model_for, spec_with_layers
from vlplan.planner.modules import param_counts
from vlplan.planner.registry import all_specs
from vlplan.planner.setup import make_setup
from vlplan.planner.spec import ModelSpec
from vlplan.planner.tokens import image_tokens

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hf_oracle import hf_config, meta_model, model_inventory, write_config  # noqa: E402

SIZES = ((640, 480), (1920, 1080))


def _first_spec(model_type: str) -> ModelSpec:
    """The model_type's first registry entry; a model_type with none (`smolvlm`: every SmolVLM entry of the registry
    is an `idefics3` checkpoint) is its folder's first entry read back through that model_type's config reader."""
    for spec in all_specs():
        if spec.family == model_type:
            return spec
    import json
    import tempfile
    from pathlib import Path

    base = importlib.import_module(family_of(model_type).module("specs")).SPECS[0]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(spec_to_hf_config(replace(base, family=model_type))))
        return spec_from_hf_config(tmp)


FIRST_SPEC = {model_type: _first_spec(model_type) for model_type in MODEL_TYPES}


def architecture(spec: ModelSpec) -> tuple:
    return (spec.family, spec.hf_class, spec.vision, spec.projector, spec.text, spec.processor, spec.image_token_id,
            spec.dtype)


def _image(w: int, h: int):
    from PIL import Image

    return Image.new("RGB", (w, h))


# The image processor each rule mirrors, run on a real image: fn(spec, w, h) -> {ImageTokens field: expected}.
# A rule with no transformers processor offline maps to the reason.


def _qwen(spec, w, h):
    p = spec.processor
    processor = transformers.Qwen2VLImageProcessorPil(
        size={"shortest_edge": p.min_pixels, "longest_edge": p.max_pixels}, patch_size=p.patch_size,
        merge_size=p.merge_size, temporal_patch_size=spec.vision.temporal_patch_size)
    patches = int(processor(images=[_image(w, h)], return_tensors="np")["image_grid_thw"].prod())
    return {"vision_patches": patches, "llm_tokens": patches // p.merge_size**2}


def _fixed(spec, w, h):
    p = spec.processor
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": p.image_size},
                                                   crop_size={"height": p.image_size, "width": p.image_size})
    side = processor(images=[_image(w, h)], return_tensors="np")["pixel_values"].shape[-1]
    return {"resized_width": side, "llm_tokens": (side // p.patch_size) ** 2, "views": 1}


def _pixtral(spec, w, h):
    p = spec.processor
    processor = transformers.PixtralImageProcessorPil(size={"longest_edge": p.longest_edge},
                                                      patch_size={"height": p.patch_size, "width": p.patch_size})
    height, width = processor(images=[_image(w, h)], return_tensors="np")["pixel_values"].shape[-2:]
    return {"resized_width": width, "resized_height": height}


def _llava_next(spec, w, h):
    p = spec.processor
    processor = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": p.image_size}, crop_size={"height": p.image_size, "width": p.image_size},
        image_grid_pinpoints=[list(pinpoint) for pinpoint in p.pinpoints])
    return {"views": processor(images=[_image(w, h)], return_tensors="np")["pixel_values"].shape[1]}


def _internvl(spec, w, h):
    p = spec.processor
    processor = transformers.GotOcr2ImageProcessorPil(size={"height": p.image_size, "width": p.image_size},
                                                      crop_to_patches=p.crop_to_patches, min_patches=p.min_tiles,
                                                      max_patches=p.max_tiles)
    views = int(processor(images=[_image(w, h)], return_tensors="np")["num_patches"][0])
    return {"views": views, "llm_tokens": views * p.tokens_per_view}


def _gemma3(spec, w, h):
    p = spec.processor
    processor = transformers.Gemma3ImageProcessorPil(size={"height": p.image_size, "width": p.image_size},
                                                     do_pan_and_scan=p.do_pan_and_scan)
    views = processor(images=[_image(w, h)], return_tensors="np")["pixel_values"].shape[0]
    return {"views": views, "llm_tokens": views * p.tokens_per_view}


def _mllama(spec, w, h):
    p = spec.processor
    processor = transformers.MllamaImageProcessorPil(size={"height": p.image_size, "width": p.image_size},
                                                     max_image_tiles=p.max_tiles)
    return {"views": processor(images=[[_image(w, h)]], return_tensors="np")["pixel_values"].shape[2]}


def _idefics3(spec, w, h):
    p = spec.processor
    processor = transformers.Idefics3ImageProcessorPil(size={"longest_edge": p.longest_edge},
                                                       max_image_size={"longest_edge": p.image_size})
    views = processor(images=[[_image(w, h)]], return_tensors="np")["pixel_values"].shape[1]
    return {"views": views, "llm_tokens": views * p.tokens_per_view}


def _siglip_fixed(spec, w, h):
    p = spec.processor
    processor = transformers.SiglipImageProcessorPil(size={"height": p.image_size, "width": p.image_size})
    side = processor(images=[_image(w, h)], return_tensors="np")["pixel_values"].shape[-1]
    return {"resized_width": side, "vision_patches": (side // p.patch_size) ** 2}


REMOTE = "remote-code processor, not in transformers (tests/test_remote_families.py checks the rule against its code)"
TOKEN_ORACLES = {
    "qwen_smart_resize": _qwen, "fixed": _fixed, "pixtral": _pixtral, "llava_next_anyres": _llava_next,
    "internvl_tiles": _internvl, "gemma3": _gemma3, "mllama_tiles": _mllama, "idefics3_tiles": _idefics3,
    "siglip_fixed": _siglip_fixed, "minicpmv_slices": REMOTE, "phi3v_crops": REMOTE,
}


def test_every_token_rule_names_its_oracle():
    """A new rule must say which transformers processor checks it (or why none can, offline)."""
    from vlplan.planner.tokens import _RULES

    rules = set(_RULES) | set(token_rules())
    assert rules == set(TOKEN_ORACLES)
    assert {spec.processor.rule for spec in all_specs()} <= rules


def test_every_folder_is_registered_once():
    from pathlib import Path

    import vlplan.planner.families as package

    folders = {path.parent.name for path in Path(package.__file__).parent.glob("*/specs.py")}
    assert folders == {family.folder for family in FAMILIES}
    assert len(MODEL_TYPES) == len(set(MODEL_TYPES))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_parts_serve_the_model_type(model_type):
    family = family_of(model_type)
    specs = importlib.import_module(family.module("specs")).SPECS
    assert specs and all(spec.family in family.model_types for spec in specs)
    config = part(model_type, "config")
    assert model_type in config.READERS and model_type in config.WRITERS and model_type in config.COMPONENT_PREFIXES
    # a preprocessor_config.json reader serves a rule of the entries this config module reads
    served = {t for f in FAMILIES for t in f.model_types if f.module("config") == family.module("config")}
    assert set(getattr(config, "PREPROCESSOR_READERS", {})) <= {spec.processor.rule for spec in all_specs()
                                                                 if spec.family in served}
    memory = part(model_type, "memory")
    assert model_type in memory.MODELS
    # the memory model names the transformers file and release (or the remote code) it mirrors
    assert "Mirrors " in memory.__doc__, f"{memory.__name__}'s docstring needs a 'Mirrors <file>, <release>' line"
    tokens = part(model_type, "tokens")
    if tokens is not None:
        # no dead rule: every rule the folder defines is some entry's processor rule
        assert set(tokens.RULES) <= {spec.processor.rule for spec in specs}
    for name in TORCH_PARTS:
        path = family.module(name)
        if path is not None:
            assert importlib.util.find_spec(path) is not None, f"{path} is registered but missing"
    assert set(PARTS) == {"specs", "config", "tokens", "memory", "batch", "tiny"}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_config_round_trip(model_type, tmp_path):
    spec = FIRST_SPEC[model_type]
    if spec.hf_class:
        write_config(tmp_path, hf_config(spec), use_diff=True)  # through transformers' own config class
    else:
        write_config(tmp_path, spec_to_hf_config(spec))
    assert architecture(spec_from_hf_config(tmp_path)) == architecture(spec)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_token_rule_matches_the_image_processor(model_type):
    spec = FIRST_SPEC[model_type]
    oracle = TOKEN_ORACLES[spec.processor.rule]
    if isinstance(oracle, str):
        pytest.skip(oracle)
    for w, h in SIZES:
        got = image_tokens(spec, w, h, llamafactory=False)
        expected = oracle(spec, w, h)
        assert {key: getattr(got, key) for key in expected} == expected, (w, h)


def _setup(spec: ModelSpec, **kw):
    return make_setup(spec, method="lora", images=[SIZES[0]], seq_len=4096, **kw)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_memory_model_estimates_a_step(model_type):
    setup = _setup(FIRST_SPEC[model_type])
    assert model_for(model_type) is part(model_type, "memory").MODELS[model_type]
    result = estimate(setup)
    assert result.peak_bytes > 0 and sum(result.breakdown_bytes.values()) == result.peak_bytes


def _shrunk(spec: ModelSpec) -> ModelSpec:
    """The same architecture with the fewest layers of each type (the tracer's extrapolation base)."""
    return spec_with_layers(spec, base_layer_counts(_setup(spec), layer_counts(spec)))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_model_builds_and_the_batch_matches_the_rule(model_type):
    spec = FIRST_SPEC[model_type]
    if not spec.hf_class:
        pytest.skip("remote-code family: no transformers class builds it offline")
    shrunk = _shrunk(spec)
    model = meta_model(shrunk)
    hf = model_inventory(model, model_type, tied_lm_head=shrunk.text.tie_word_embeddings)
    assert param_counts(shrunk) == hf.params
    path = family_of(model_type).module("batch")
    assert path is not None, "a transformers family needs a synthetic batch (planner/families/<family>/batch.py)"
    setup = replace(_setup(shrunk), batch_size=2)
    batch = importlib.import_module(path).BUILDERS[model_type](setup, model)
    ids = batch["input_ids"]
    assert tuple(ids.shape) == (setup.batch_size, setup.seq_len)
    llm_tokens = sum(image_tokens(shrunk, w, h).llm_tokens for w, h in setup.images)
    assert int((ids[0] == spec.image_token_id).sum()) == llm_tokens


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.tiny], ids=lambda f: f.folder)
def test_tiny_model_spec_builds(family):
    """The family's tiny model: its spec shrinks the family's own registry entry and transformers builds it."""
    from vlplan.runner.tiny import tiny_spec

    module = importlib.import_module(family.module("tiny"))
    for name, base in module.TINY_MODELS.items():
        spec = tiny_spec(name, image_token_id=900)
        assert spec.family in {s.family for s in all_specs() if s.name == base}
        hf = model_inventory(meta_model(spec), spec.family, tied_lm_head=spec.text.tie_word_embeddings)
        assert param_counts(spec) == hf.params


# Typed choices of the spec fields that select code ---------------------------------------------------------------


@pytest.mark.parametrize("component,field,value", [
    ("vision", "norm", "batchnorm"),  # once read as RMSNorm by memory/vision.py
    ("vision", "mlp", "gated_gelu"),  # once modelled as an ungated MLP
    ("vision", "arch", "vit_huge"),
    ("text", "arch", "gpt2"),
    ("text", "mlp", "relu"),
    ("text", "norm", "layernorm"),
    ("projector", "arch", "qformer"),
    ("projector", "norm", "groupnorm"),
])
def test_an_unmodelled_choice_is_refused_at_construction(component, field, value):
    from vlplan.planner.errors import VlplanError

    spec = FIRST_SPEC["qwen2_5_vl"]
    with pytest.raises(VlplanError, match=rf"^{component}\.{field} '{value}' is not a modelled choice; use one of"):
        replace(getattr(spec, component), **{field: value})


def test_a_config_with_an_unmodelled_activation_is_refused_in_one_line(tmp_path):
    """A Pixtral tower with hidden_act gelu would be a gated GELU MLP, which no memory model has."""
    from vlplan.planner.errors import VlplanError

    spec = next(spec for spec in all_specs() if spec.vision.arch == "pixtral")
    config = spec_to_hf_config(spec)
    config["vision_config"]["hidden_act"] = "gelu"
    write_config(tmp_path, config)
    with pytest.raises(VlplanError, match=r"vision\.mlp 'gated_gelu' is not a modelled choice") as error:
        spec_from_hf_config(tmp_path)
    assert "\n" not in str(error.value)
