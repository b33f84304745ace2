"""Per-component gradient checkpointing (ms-swift `vit_gradient_checkpointing`) and offloaded checkpointing
(LLaMA-Factory `use_unsloth_gc`): the estimator against the tracer (which runs LLaMA-Factory's own preparation, its
unsloth Function's host/device copies emulated: profiler/checkpoint_offload.py), host RAM, validation, flags and the
LLaMA-Factory round trip."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from vlplan.cli.main import app
from vlplan.planner.errors import VlplanError
from vlplan.planner.memory.estimate import estimate
from vlplan.planner.memory.step import simulate
from vlplan.planner.registry import resolve
from vlplan.planner.setup import make_setup

from tiny import assert_phases_match, tiny_spec

SMALL = dict(seq_len=256, image_size=(112, 112))
VISION_FULL = dict(method="full", train_vision=True, train_projector=True)
CASES = [
    ("qwen2.5-vl-3b", dict(VISION_FULL, vision_gradient_checkpointing=False)),  # language model only
    ("qwen2.5-vl-3b", dict(VISION_FULL, gradient_checkpointing=False, vision_gradient_checkpointing=True)),  # ViT only
    ("llava-1.5-7b", dict(method="full", train_vision=True, stack="hf-trainer", vision_gradient_checkpointing=False)),
    ("qwen2.5-vl-3b", dict(method="lora", stack="llamafactory", offload_checkpoints=True)),
    ("qwen2-vl-2b", dict(method="full", train_vision=True, stack="llamafactory", offload_checkpoints=True)),
    ("llava-1.5-7b", dict(method="lora", stack="llamafactory", offload_checkpoints=True)),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs", CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}" for c in CASES])
def test_simulation_matches_trace(name, kwargs):
    pytest.importorskip("transformers")
    if kwargs.get("stack") == "llamafactory":
        pytest.importorskip("llamafactory")
    from vlplan.profiler.trace import run_trace

    setup = make_setup(tiny_spec(name), **SMALL, **kwargs)
    simulated, traced = simulate(setup), run_trace(setup)
    assert_phases_match(simulated, traced)
    # the checkpointed inputs LLaMA-Factory's unsloth Function moved to host RAM, at their peak
    assert simulated.host_peak_bytes == traced.host_peak_bytes
    assert (simulated.host_peak_bytes > 0) == bool(kwargs.get("offload_checkpoints"))


def test_each_component_checkpointed_alone_lies_between_both_and_none():
    # issue 12's Qwen2.5-VL-7B full fine-tune measurement: both 48 GiB < LLM only < ViT only < none 77 GiB (with
    # video; here two large images)
    model = resolve("qwen2.5-vl-7b")
    kw = dict(VISION_FULL, num_images=2, image_size=(1344, 1344), seq_len=8192)
    peaks = {name: estimate(make_setup(model, **kw, **extra)).peak_bytes for name, extra in (
        ("both", {}), ("llm", dict(vision_gradient_checkpointing=False)),
        ("vit", dict(gradient_checkpointing=False, vision_gradient_checkpointing=True)),
        ("none", dict(gradient_checkpointing=False)))}
    assert peaks["both"] < peaks["llm"] < peaks["none"] and peaks["both"] < peaks["vit"] < peaks["none"]


def test_offloaded_checkpoints_move_to_host_ram():
    model = resolve("qwen2.5-vl-7b")
    on, off = (estimate(make_setup(model, stack="llamafactory", seq_len=8192, offload_checkpoints=flag))
               for flag in (True, False))
    t = model.text
    # one bf16 (seq, hidden) input per checkpointed language layer (the LoRA-frozen vision tower is not checkpointed)
    assert on.cpu_breakdown_bytes["host/offloaded_checkpoints"] == t.num_layers * 8192 * t.hidden_size * 2
    assert "host/offloaded_checkpoints" not in off.cpu_breakdown_bytes
    assert on.peak_bytes < off.peak_bytes


@pytest.mark.parametrize("kwargs, message", [
    (dict(stack="llamafactory", vision_gradient_checkpointing=False), "LLaMA-Factory checkpoints the vision tower"),
    (dict(offload_checkpoints=True), "use_unsloth_gc; use it with --stack llamafactory"),
    (dict(stack="llamafactory", gradient_checkpointing=False, offload_checkpoints=True), "needs gradient checkpoint"),
])
def test_contradictions_are_refused(kwargs, message):
    with pytest.raises(VlplanError, match=message):
        make_setup(resolve("qwen2.5-vl-7b"), **kwargs)


def test_unsloth_gc_round_trips_through_llamafactory(tmp_path):
    out = tmp_path / "train.yaml"
    result = CliRunner().invoke(app, ["plan", "--model", "qwen2.5-vl-7b", "--stack", "llamafactory",
                                      "--offload-checkpoints", "--global-batch-size", "8", "--export-llamafactory",
                                      str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(out.read_text())["use_unsloth_gc"] is True
    result = CliRunner().invoke(app, ["estimate", "--from-llamafactory", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["settings"]["offload_checkpoints"] is True
    assert data["cpu_breakdown_bytes"]["host/offloaded_checkpoints"] > 0


def test_plan_for_llamafactory_refuses_per_component_checkpointing(tmp_path):
    # exporting plans for LLaMA-Factory's stack, which cannot switch the towers' checkpointing apart: one line
    result = CliRunner().invoke(app, ["plan", "--model", "qwen2.5-vl-7b", "--method", "full", "--train-vision",
                                      "--no-vision-gradient-checkpointing", "--global-batch-size", "8",
                                      "--export-llamafactory", str(tmp_path / "train.yaml")])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)  # a VlplanError, in one line
    assert "LLaMA-Factory checkpoints the vision tower and the language model together" in result.output
    assert not (tmp_path / "train.yaml").exists()


def test_per_component_checkpointing_is_not_exported_to_llamafactory():
    from vlplan.planner.io.llamafactory import llamafactory_yaml

    model = resolve("qwen2.5-vl-7b")
    with pytest.raises(VlplanError, match="LLaMA-Factory has no per-component checkpointing"):
        llamafactory_yaml(make_setup(model, **VISION_FULL, vision_gradient_checkpointing=False))
    # the same switch for both towers is LLaMA-Factory's disable_gradient_checkpointing
    same = llamafactory_yaml(make_setup(model, **VISION_FULL, gradient_checkpointing=False,
                                        vision_gradient_checkpointing=False))
    assert same["disable_gradient_checkpointing"] is True


def test_per_component_checkpointing_is_simulated_at_full_depth():
    # the 2-and-3-layer extrapolation is not affine there (step.py `_simulate_extrapolated`): at full depth the
    # language model's gradients pile up under the un-checkpointed vision tower's activations
    from vlplan.planner.memory.step import simulate_extrapolated

    setup = make_setup(resolve("qwen2.5-vl-7b"), **VISION_FULL, vision_gradient_checkpointing=False,
                       image_size=(1024, 1024))
    assert simulate_extrapolated(setup).phase_peaks == simulate(setup).phase_peaks


def test_hf_arguments_refuse_what_the_trainer_cannot_do():
    from vlplan.planner.io.hf_args import check_exportable

    model = resolve("qwen2.5-vl-7b")
    with pytest.raises(VlplanError, match="one gradient_checkpointing switch"):
        check_exportable(make_setup(model, **VISION_FULL, vision_gradient_checkpointing=False))
    with pytest.raises(VlplanError, match="use_unsloth_gc"):
        check_exportable(make_setup(model, stack="llamafactory", offload_checkpoints=True))
    check_exportable(make_setup(model, **VISION_FULL, vision_gradient_checkpointing=True))  # same as the rest: fine


@pytest.mark.slow
def test_extrapolated_trace_reports_the_host_copies_the_estimate_counts():
    pytest.importorskip("llamafactory")
    from vlplan.profiler.trace import trace

    setup = make_setup(tiny_spec("qwen2.5-vl-3b", text_layers=4), stack="llamafactory", offload_checkpoints=True,
                       **SMALL)
    traced = trace(setup, layers=1)  # 1 and 2 text layers traced, extrapolated to 4
    assert traced.extrapolated and "UnslothGradientCheckpointing" in " ".join(traced.emulated)
    assert traced.host_offloaded_bytes == estimate(setup).cpu_breakdown_bytes["host/offloaded_checkpoints"] > 0
