"""Parameter counts and nn.Linear inventories per component equal the transformers model classes instantiated on the
meta device; remote-code families match their published totals; every registry name, hub id and alias resolves."""

from dataclasses import replace

import pytest
from vlplan.planner.errors import VlplanError
from vlplan.planner.families.minicpmv import specs as minicpmv
from vlplan.planner.families.phi3_v import specs as phi3_v
from vlplan.planner.modules import COMPONENTS, model_inventory, param_counts
from vlplan.planner.registry import all_specs, resolve
from vlplan.planner.spec import FAMILIES

transformers = pytest.importorskip("transformers")
from hf_oracle import hf_inventory  # noqa: E402

HF_SPECS = [spec for spec in all_specs() if spec.hf_class and hasattr(transformers, spec.hf_class)]
REMOTE_SPECS = [spec for spec in all_specs() if not spec.hf_class]
# Families whose checkpoints need the hub repo's own code: no transformers class to compare against
REMOTE_FAMILIES = {"minicpmv", "phi3_v"}
PUBLISHED_TOTAL_PARAMS = {**minicpmv.PUBLISHED_TOTAL_PARAMS, **phi3_v.PUBLISHED_TOTAL_PARAMS}


def test_every_family_with_a_class_is_covered():
    # smolvlm (the SmolVLM2 class) has no registry entry; test_hf_config checks it through a SmolVLM config
    assert {spec.family for spec in HF_SPECS} == set(FAMILIES) - REMOTE_FAMILIES - {"smolvlm"}
    assert {spec.family for spec in REMOTE_SPECS} == REMOTE_FAMILIES


@pytest.mark.parametrize("spec", HF_SPECS, ids=lambda spec: spec.name)
def test_param_counts_equal_transformers(spec):
    assert param_counts(spec) == hf_inventory(spec).params


@pytest.mark.parametrize("spec", HF_SPECS, ids=lambda spec: spec.name)
def test_linears_equal_transformers(spec):
    """The LoRA-targetable modules: same last-name component, shapes, bias and count as the nn.Linear modules."""
    inventory = model_inventory(spec)
    for component in COMPONENTS:
        ours = {}
        for linear in inventory[component].linears:
            key = (linear.name, linear.in_features, linear.out_features, linear.bias)
            ours[key] = ours.get(key, 0) + linear.count
        assert ours == dict(hf_inventory(spec).linears[component]), component


def _variants():
    """Options no registry entry uses but config.json files can set: the inventory must follow them too."""
    gemma = resolve("gemma-3-4b").with_text_layers(6)
    internvl = resolve("internvl3-1b")
    qwen3 = resolve("qwen3-vl-8b").with_text_layers(2)
    return {
        "siglip-with-pooling-head": replace(gemma, vision=replace(gemma.vision, use_head=True)),
        "internvit-without-mean-pooling": replace(internvl, vision=replace(internvl.vision, post_layernorm=True)),
        "qwen3-vl-without-deepstack": replace(qwen3, vision=replace(qwen3.vision, deepstack_visual_indexes=())),
    }


@pytest.mark.parametrize("name", list(_variants()))
def test_variants_equal_transformers(name):
    spec = _variants()[name]
    assert param_counts(spec) == hf_inventory(spec).params


@pytest.mark.parametrize("spec", HF_SPECS + REMOTE_SPECS, ids=lambda spec: spec.name)
def test_layer_linears_are_one_repeated_layer(spec):
    inventory = model_inventory(spec)
    for component in (COMPONENTS[0], COMPONENTS[2]):  # vision, language
        layer = inventory[component].layer_linears
        assert layer and all(linear.count == 1 for linear in layer)
        names = {linear.name for linear in inventory[component].linears}
        assert {linear.name for linear in layer} <= names


@pytest.mark.parametrize("spec", REMOTE_SPECS, ids=lambda spec: spec.name)
def test_remote_code_specs_match_published_totals(spec):
    published, source = PUBLISHED_TOTAL_PARAMS[spec.name]
    total = param_counts(spec)["total"]
    assert abs(total - published) / published < 0.005, f"{total:,} vs published {published:,.0f} ({source})"


@pytest.mark.parametrize("spec", all_specs(), ids=lambda spec: spec.name)
def test_every_name_resolves_case_insensitively(spec):
    for key in (spec.name, spec.hf_id, *spec.aliases):
        assert resolve(key) is spec
        assert resolve(key.upper()) is spec
        assert resolve(f"  {key.lower()}  ") is spec


def test_unknown_names_suggest_close_ones():
    with pytest.raises(VlplanError, match=r"unknown model 'qwen3-vl-9b'; did you mean .*qwen3-vl-8b"):
        resolve("qwen3-vl-9b")
    with pytest.raises(VlplanError, match="run `vlplan models`"):
        resolve("zzzzzz")
