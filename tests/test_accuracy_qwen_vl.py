"""The estimator's Qwen2-VL / Qwen2.5-VL activation model against the tracer, per phase, on tiny specs that keep the
code paths where the autograd engine's memory behaviour matters: tied embeddings (one AccumulateGrad fed by two
uses), gradient accumulation into an existing `.grad`, gradients summed while a reentrant checkpoint still holds its
incoming gradient (out of place) or not (in place), and DoRA's identity-matrix weight product."""

import pytest

from vlplan.planner.memory.step import simulate
from vlplan.planner.setup import make_setup

from tiny import assert_phases_match, tiny_spec

SMALL = dict(seq_len=256, image_size=(112, 112))
CASES = [
    # (registry model, make_setup kwargs); tiny_spec keeps tie_word_embeddings of the 2B/3B checkpoints
    ("qwen2-vl-2b", dict(method="full", gradient_accumulation_steps=2)),
    ("qwen2-vl-2b", dict(method="full", optimizer="sgd")),
    # max_grad_norm 0: no clipping, so the fused AdamW step allocates nothing and there is no optimizer-phase peak
    ("qwen2-vl-2b", dict(method="full", max_grad_norm=0.0)),
    ("qwen2-vl-2b", dict(method="full", train_vision=True, train_projector=True)),
    ("qwen2-vl-2b", dict(method="lora", dora=True, gradient_checkpointing=False)),
    ("qwen2.5-vl-3b", dict(method="full", train_vision=True, train_projector=True, gradient_accumulation_steps=2)),
    ("qwen2.5-vl-3b", dict(method="lora", train_vision=True, gradient_checkpointing=False)),
    # lora_dropout > 0: CUDA's native_dropout mask and the dropped copy lora_A saves, per adapter path; DoRA then
    # computes its own base product on the dropped input
    ("qwen2.5-vl-3b", dict(method="lora", lora_dropout=0.05, gradient_checkpointing=False)),
    ("qwen2.5-vl-3b", dict(method="lora", lora_dropout=0.1, train_vision=True)),
    ("qwen2-vl-2b", dict(method="lora", dora=True, lora_dropout=0.05, gradient_checkpointing=False)),
    # Adafactor: factored states of the 5-D patch convolution, the loop's `update` outliving its parameter (the
    # projector's last weight, then the tied embedding), and with pure bf16 the fp32 copies of grad and weight
    ("qwen2-vl-2b", dict(method="full", train_vision=True, train_projector=True, optimizer="adafactor",
                         gradient_checkpointing=False)),
    ("qwen2.5-vl-3b", dict(method="full", train_vision=True, train_projector=True, optimizer="adafactor",
                           precision="pure-bf16", gradient_checkpointing=False)),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs", CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}" for c in CASES])
def test_simulation_matches_trace(name, kwargs):
    pytest.importorskip("transformers")
    from vlplan.profiler.trace import run_trace

    spec = tiny_spec(name)
    assert spec.text.tie_word_embeddings
    setup = make_setup(spec, **SMALL, **kwargs)
    simulated = simulate(setup)
    traced = run_trace(setup)
    assert_phases_match(simulated, traced)
