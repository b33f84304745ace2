"""Every registry entry names its source and says what is unverified about it: the URL of the config it came from is
its `source_url` and the comment right before the entry, and an entry with an `unverified` note gets a one-line warning
(`unverified_warning`) that names the model and the note, while a verified one gets none."""

import inspect
from dataclasses import replace

import pytest
from vlplan.planner.families.qwen2_5_vl import specs as qwen2_5_vl
from vlplan.planner.registry import all_specs
from vlplan.planner.spec import unverified_warning

SPECS = all_specs()


def _comment_before(spec) -> str:
    """The block of comment lines right before the entry's statement in its registry module."""
    lines = inspect.getsource(_entry_module(spec)).splitlines()
    # the entry is `_family("name", ...)` or `ModelSpec(\n    name="name", ...)` (its statement starts a line earlier)
    at = next(i for i, line in enumerate(lines) if f'("{spec.name}"' in line or f'name="{spec.name}"' in line)
    if lines[at].strip().startswith("name="):
        at -= 1
    block = []
    for line in reversed(lines[:at]):
        if not line.strip().startswith("#"):
            break
        block.append(line.strip().lstrip("#").strip())
    return " ".join(reversed(block))


def _entry_module(spec):
    from vlplan.planner.families import spec_modules

    for module in spec_modules():
        if spec in module.SPECS:
            return module
    raise AssertionError(f"{spec.name} is in no registry module")


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_entry_records_its_source(spec):
    assert spec.source_url.startswith("https://huggingface.co/") and spec.source_url.endswith("config.json")
    assert spec.hf_id in spec.source_url, "the source URL must be the entry's own checkpoint"
    assert spec.source_url in _comment_before(spec), "the comment before the entry must start with its source URL"


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_unverified_entries_warn_and_verified_ones_do_not(spec):
    warning = unverified_warning(spec)
    if not spec.unverified.strip():
        assert warning is None
        return
    assert isinstance(warning, str) and "\n" not in warning
    assert warning.startswith(f"{spec.name}: ")
    assert " ".join(spec.unverified.split()) in warning
    assert "--model <local config.json>" in warning


def test_a_spec_read_from_a_local_file_points_at_that_file():
    spec = replace(SPECS[0], source_url="/data/ckpt/config.json", unverified="remote-code inventory is analytic")
    warning = unverified_warning(spec)
    assert "remote-code inventory is analytic" in warning and "/data/ckpt/config.json" in warning
    assert "--model" not in warning


def test_the_notes_say_why_not_just_that():
    """A note names what is unverified and why; a bare marker would tell the user nothing to check."""
    for spec in SPECS:
        if spec.unverified:
            assert len(spec.unverified.split()) >= 6, spec.name


def test_qwen2_5_vl_large_towers_have_the_wider_mlp():
    """32B/72B configs write vision_config.intermediate_size 3456; the 3B/7B keep the class default 3420 (see the
    sources in families/qwen2_5_vl/specs.py). A tower shared across sizes would silently lose 4,425,984 parameters."""
    sizes = {spec.name: spec.vision.intermediate_size for spec in qwen2_5_vl.SPECS}
    assert sizes == {"qwen2.5-vl-3b": 3420, "qwen2.5-vl-7b": 3420, "qwen2.5-vl-32b": 3456, "qwen2.5-vl-72b": 3456}
