"""The estimator's OFT model (peft `oft.Linear` / `OFTRotationModule`, built the way LLaMA-Factory's adapter.py builds
its OFTConfig) against the tracer, per phase, on tiny specs of two families: the skew-symmetric matrix, the
Cayley-Neumann bmm chain with autocast copies of each operand, the einsum's saved copies of input and rotation, the
reshape copy of its permuted result and the fp32 round trip of the rotated input, with and without reentrant
checkpointing, on LoRA-style targets of the vision tower too, and under each training stack."""

import pytest

from vlplan.planner.memory.estimate import param_summary
from vlplan.planner.memory.step import simulate
from vlplan.planner.setup import make_setup

from tiny import assert_phases_match, tiny_spec

SMALL = dict(seq_len=256, image_size=(112, 112))
CASES = [
    ("qwen2-vl-2b", dict(gradient_checkpointing=False)),
    ("qwen2.5-vl-3b", {}),
    # oft_rank: the block size follows from in_features (64 on the 256-wide tiny model, 128 for down_proj); vision
    # tower linears adapted too
    ("qwen2.5-vl-3b", dict(train_vision=True, oft_rank=4)),
    ("llava-1.5-7b", dict(stack="llamafactory")),
    ("llava-1.5-7b", dict(gradient_checkpointing=False, oft_block_size=16, lora_target="q_proj,down_proj")),
    ("qwen2-vl-2b", dict(precision="pure-bf16", stack="hf-trainer")),
    # module_dropout: peft builds the dropout module but its forward never calls it; the trace agrees
    ("qwen2-vl-2b", dict(gradient_checkpointing=False, module_dropout=0.1)),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs", CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items()) or 'default'}" for c in CASES])
def test_simulation_matches_trace(name, kwargs):
    pytest.importorskip("peft")
    from vlplan.profiler.trace import run_trace

    setup = make_setup(tiny_spec(name), method="oft", **SMALL, **kwargs)
    assert_phases_match(simulate(setup), run_trace(setup))


@pytest.mark.parametrize("name, kwargs", CASES[2:5],
                         ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}" for c in CASES[2:5]])
def test_trainable_parameters_equal_peft(name, kwargs):
    """The planner's OFT parameter count (blocks x b(b-1)/2 per adapted linear) equals peft's on the built model."""
    pytest.importorskip("peft")
    from vlplan.profiler.build import create_model, prepare_model

    setup = make_setup(tiny_spec(name), method="oft", **SMALL, **kwargs)
    model = prepare_model(create_model(setup), setup)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".oft_R." in n for n in trainable)
    assert param_summary(setup)[1]["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("in_features, rank, block_size", [(256, 0, 32), (512, 0, 48), (3584, 0, 32), (1280, 0, 100),
                                                          (256, 3, 0), (18944, 16, 0), (64, 0, 128)])
def test_block_sizes_equal_peft(in_features, rank, block_size):
    """`OftSettings.blocks` gives the (blocks, block size) peft's `OFTLayer.update_layer` picks, adjusted sizes too."""
    pytest.importorskip("peft")
    import warnings

    import peft
    import torch

    from vlplan.planner.setup import OftSettings

    layer = torch.nn.Sequential(torch.nn.Linear(in_features, 8, bias=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns when it adjusts a size that does not divide in_features
        model = peft.get_peft_model(layer, peft.OFTConfig(r=rank, oft_block_size=block_size, target_modules=["0"]))
    module = model.base_model.model[0]
    expected = (module.r["default"], module.oft_block_size["default"])
    assert OftSettings(rank=rank, block_size=block_size).blocks(in_features) == expected
