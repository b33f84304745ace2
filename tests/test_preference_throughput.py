"""The step-time model (planner/throughput.py) of LLaMA-Factory's preference stages: DPO runs the policy on the chosen
and rejected rows (2 x batch_size) and, for the sigmoid loss, the reference forward on the same rows without
backward; KTO runs the policy on batch_size target rows and three forwards of batch_size rows without backward (the
KL rows on the policy, the target and KL rows on the reference). Held to the SFT step of the same rows and to the
2 x parameters x tokens rule for a forward pass."""

from __future__ import annotations

import pytest

from vlplan.planner.memory.estimate import estimate
from vlplan.planner.registry import resolve
from vlplan.planner.setup import make_setup
from vlplan.planner.throughput import step_time

MODEL = "qwen2.5-vl-7b"


def _step(**kwargs):
    return step_time(make_setup(resolve(MODEL), stack="llamafactory", num_images=0, seq_len=2048, **kwargs))


def test_dpo_doubles_the_rows_and_adds_the_reference_forward():
    sft = _step(batch_size=2)
    dpo = _step(batch_size=1, stage="dpo")
    orpo = _step(batch_size=1, stage="dpo", pref_loss="orpo")
    # the policy's forward, backward and recompute are those of SFT on the 2 rows; ORPO has no reference
    for part in ("compute", "recompute"):
        assert dpo.parts[part] == orpo.parts[part] == sft.parts[part]
    assert "reference_forward" not in orpo.parts and "reference_forward" not in sft.parts
    reference = dpo.parts["reference_forward"]
    assert dpo.seconds == pytest.approx(orpo.seconds + reference)
    # a forward is about 2 FLOPs per parameter per token (the language model's linears and head; attention adds a
    # few percent at 2k tokens)
    setup = make_setup(resolve(MODEL), stack="llamafactory", num_images=0, seq_len=2048)
    params = estimate(setup).params
    linear_params = params["language"] - resolve(MODEL).text.vocab_size * resolve(MODEL).text.hidden_size  # no embed
    flops = reference * setup.gpu.tflops_bf16 * 1e12 * dpo.mfu
    assert 1.0 < flops / (2 * linear_params * 2 * 2048) < 1.1


def test_the_lora_reference_costs_what_the_frozen_copy_costs():
    lora = _step(stage="dpo")
    full = _step(stage="dpo", method="full")
    assert lora.parts["reference_forward"] == full.parts["reference_forward"]


def test_kto_runs_three_forwards_without_backward():
    sft = _step(batch_size=2)
    dpo = _step(batch_size=1, stage="dpo")  # its reference forward: one forward of 2 rows
    kto = _step(batch_size=2, stage="kto")
    assert kto.parts["compute"] == sft.parts["compute"] and kto.parts["recompute"] == sft.parts["recompute"]
    assert kto.parts["kl_forward"] == pytest.approx(dpo.parts["reference_forward"])
    assert kto.parts["reference_forward"] == pytest.approx(2 * dpo.parts["reference_forward"])
    assert kto.seconds == pytest.approx(sft.seconds + 3 * dpo.parts["reference_forward"])
    accumulated = _step(batch_size=2, stage="kto", gradient_accumulation_steps=4)
    assert accumulated.parts["kl_forward"] == pytest.approx(4 * kto.parts["kl_forward"])
