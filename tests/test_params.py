"""Parameter counts per component equal the transformers model classes instantiated on the meta device."""

import pytest

from vlplan.planner.modules import param_counts
from vlplan.planner.registry import all_specs

transformers = pytest.importorskip("transformers")
from hf_oracle import hf_param_counts  # noqa: E402

HF_SPECS = [spec for spec in all_specs() if spec.hf_class and hasattr(transformers, spec.hf_class)]


def test_every_family_with_a_class_is_covered():
    assert {spec.family for spec in HF_SPECS} >= {"qwen2_vl", "qwen2_5_vl", "llava"}


@pytest.mark.parametrize("spec", HF_SPECS, ids=lambda spec: spec.name)
def test_param_counts_equal_transformers(spec):
    assert param_counts(spec) == hf_param_counts(spec)
