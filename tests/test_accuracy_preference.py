"""LLaMA-Factory's preference stage (`stage: dpo`, planner/memory/preference.py) against the tracer, which runs the
DPO trainer's methods in torch on the real transformers/peft model (profiler/preference.py), per phase, on the
shrunken specs of the family accuracy tests: DPO (sigmoid) with the reference as the LoRA policy with adapters
disabled and as a frozen copy (full fine-tuning), ORPO and SimPO (no reference), pref_ftx."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from vlplan.planner.errors import VlplanError
from vlplan.planner.memory.estimate import estimate
from vlplan.planner.memory.step import simulate
from vlplan.planner.registry import resolve as get_model
from vlplan.planner.setup import make_setup

from test_accuracy_llava import tiny as tiny_llava
from tiny import assert_phases_match, tiny_spec

QWEN = dict(seq_len=256, image_size=(112, 112))
LF = dict(stack="llamafactory", stage="dpo")
CASES = [
    (tiny_spec, "qwen2.5-vl-3b", dict(**LF, **QWEN), None),
    (tiny_spec, "qwen2.5-vl-3b", dict(**LF, **QWEN, method="full"), None),
    (tiny_spec, "qwen2.5-vl-3b", dict(**LF, **QWEN, pref_loss="orpo"), None),
    (tiny_spec, "qwen2.5-vl-3b", dict(**LF, **QWEN, pref_loss="simpo", pref_ftx=0.5), None),
    (tiny_spec, "qwen2-vl-2b", dict(**LF, **QWEN, batch_size=2, train_projector=True), None),
    (tiny_llava, "llava-1.5-7b", dict(**LF), dict(text=2, vision=2)),
    (tiny_llava, "llava-1.5-7b", dict(**LF, pref_loss="orpo"), dict(text=2, vision=2)),
    (tiny_llava, "llava-1.5-7b", dict(**LF, pref_ftx=1.0, batch_size=2), dict(text=2, vision=2)),
    # OFT: create_ref_model loads a frozen copy for every finetuning_type but lora
    (tiny_spec, "qwen2.5-vl-3b", dict(**LF, **QWEN, method="oft"), None),
    # the trainer zeroes LoRA's dropout (trl disable_dropout_in_model)
    (tiny_spec, "qwen2.5-vl-3b", dict(**LF, **QWEN, lora_dropout=0.05), None),
]


@pytest.mark.slow
@pytest.mark.parametrize("factory, name, kwargs, counts", CASES,
                         ids=[f"{c[1]}-{'-'.join(f'{k}={v}' for k, v in c[2].items())}" for c in CASES])
def test_preference_simulation_matches_trace(factory, name, kwargs, counts):
    pytest.importorskip("transformers")
    pytest.importorskip("llamafactory")
    from vlplan.profiler.trace import run_trace

    setup = make_setup(factory(name), **kwargs)
    simulated = simulate(setup, counts)
    traced = run_trace(setup, counts)
    assert_phases_match(simulated, traced)


def test_get_batch_logps_is_llamafactorys():
    """The tracer's transcript of LLaMA-Factory's get_batch_logps returns what LLaMA-Factory's own function returns:
    its source is taken from the installed package (the module itself imports trl, which is not installed)."""
    torch = pytest.importorskip("torch")
    llamafactory = pytest.importorskip("llamafactory")
    from vlplan.profiler.preference import get_batch_logps

    source = (Path(llamafactory.__file__).parent / "train" / "trainer_utils.py").read_text()
    function = next(node for node in ast.parse(source).body
                    if isinstance(node, ast.FunctionDef) and node.name == "get_batch_logps")
    namespace = {"torch": torch, "IGNORE_INDEX": -100, "Optional": None, "Union": None}
    function.returns = None
    for arg in function.args.args:
        arg.annotation = None
    exec(compile(ast.Module([function], []), "trainer_utils.py", "exec"), namespace)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, 11, generator=generator)
    labels = torch.randint(0, 11, (4, 9), generator=generator)
    labels[:, :3] = -100
    expected = namespace["get_batch_logps"](logits, labels.clone())
    got = get_batch_logps(logits, labels.clone())
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def _setup(**kwargs):
    return make_setup(get_model("qwen2.5-vl-7b"), stack="llamafactory", seq_len=2048, **kwargs)


def test_dpo_costs_more_than_sft_and_the_copy_is_counted():
    sft = estimate(_setup(method="full"))
    dpo = estimate(_setup(method="full", stage="dpo"))
    orpo = estimate(_setup(method="full", stage="dpo", pref_loss="orpo"))
    assert dpo.peak_bytes > orpo.peak_bytes > sft.peak_bytes
    # the frozen copy: every parameter once, in bf16
    reference = sum(v for k, v in dpo.breakdown_bytes.items() if k.startswith("reference/"))
    assert reference >= 2 * dpo.params["total"]
    assert not any(k.startswith("reference/") for k in orpo.breakdown_bytes)
    lora = estimate(_setup(stage="dpo"))
    assert not any(k.startswith("reference/") for k in lora.breakdown_bytes)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stage="dpo"), "--stack llamafactory"),
    (dict(stage="dpo", stack="llamafactory", lora_dropout=0.1, dora=True), "dropout"),
    (dict(stage="dpo", stack="llamafactory", method="full", zero=3, num_gpus=2), "ZeRO-3"),
    (dict(stage="kto", stack="llamafactory"), "--stage"),
    (dict(stage="dpo", stack="llamafactory", pref_loss="ipo"), "--pref-loss"),
])
def test_unmodelled_preference_settings_are_refused(kwargs, message):
    with pytest.raises(VlplanError, match=message):
        make_setup(get_model("qwen2.5-vl-7b"), **kwargs)


def test_cli_takes_the_stage():
    import json

    from typer.testing import CliRunner

    from vlplan.cli.main import app

    runner = CliRunner()
    args = ["estimate", "--model", "qwen2.5-vl-7b", "--stack", "llamafactory", "--json"]
    sft = json.loads(runner.invoke(app, args).stdout)
    result = runner.invoke(app, [*args, "--stage", "dpo", "--pref-loss", "simpo"])
    assert result.exit_code == 0, result.output
    dpo = json.loads(result.stdout)
    assert (dpo["settings"]["stage"], dpo["settings"]["pref_loss"]) == ("dpo", "simpo")
    assert dpo["peak_bytes"] > sft["peak_bytes"]
    refused = runner.invoke(app, ["estimate", "--model", "qwen2.5-vl-7b", "--stage", "dpo"])
    assert refused.exit_code != 0 and "--stack llamafactory" in refused.output
