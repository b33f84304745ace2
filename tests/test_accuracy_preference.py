"""LLaMA-Factory's preference stages (`stage: dpo` and `stage: kto`, planner/memory/preference.py) against the tracer,
which runs the trainers' methods in torch on the real transformers/peft model (profiler/preference.py), per phase, on
the shrunken specs of the family accuracy tests: DPO (sigmoid) with the reference as the LoRA policy with adapters
disabled and as a frozen copy (full fine-tuning), ORPO and SimPO (no reference), pref_ftx; KTO (target and KL
forwards, both reference forwards) at batch 1 (one row: its shifted logits are contiguous), 2 and 3."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from vlplan.planner.errors import VlplanError
from vlplan.planner.memory.estimate import estimate
from vlplan.planner.memory.step import simulate
from vlplan.planner.registry import resolve as get_model
from vlplan.planner.setup import make_setup
from vlplan.planner.video import Video

from test_accuracy_llava import tiny as tiny_llava
from tiny import assert_phases_match, tiny_spec

QWEN = dict(seq_len=256, image_size=(112, 112))
LF = dict(stack="llamafactory", stage="dpo")
KTO = dict(stack="llamafactory", stage="kto")
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
    # KTO: LoRA (reference: adapters disabled), full (a frozen copy), odd batches (the desirable / undesirable split)
    (tiny_spec, "qwen2.5-vl-3b", dict(**KTO, **QWEN), None),
    (tiny_spec, "qwen2.5-vl-3b", dict(**KTO, **QWEN, method="full"), None),
    (tiny_spec, "qwen2.5-vl-3b", dict(**KTO, **QWEN, batch_size=2, lora_dropout=0.05), None),
    (tiny_spec, "qwen2-vl-2b", dict(**KTO, **QWEN, batch_size=3, pref_ftx=0.5, train_projector=True), None),
    (tiny_llava, "llava-1.5-7b", dict(**KTO), dict(text=2, vision=2)),
    (tiny_llava, "llava-1.5-7b", dict(**KTO, batch_size=2, pref_ftx=1.0), dict(text=2, vision=2)),
    # (full fine-tuning at 256 tokens: at 2048 the forward phase of LLaVA full fine-tuning is 2% under the trace for
    # SFT as well, the query projection outliving the key's rotary embedding in the checkpointed layer)
    (tiny_llava, "llava-1.5-7b", dict(**KTO, method="full", seq_len=256), dict(text=2, vision=2)),
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
    (dict(stage="ppo", stack="llamafactory"), "--stage"),
    (dict(stage="kto"), "CustomKTOTrainer.*--stack llamafactory"),
    (dict(stage="kto", stack="llamafactory", pref_loss="orpo"), "does not read it"),
    (dict(stage="kto", stack="llamafactory", videos=(Video(320, 240, frames=8),)), "pixel_values_videos"),
    (dict(stage="kto", stack="llamafactory", packing=True), "does not pack"),
    (dict(stage="kto", stack="llamafactory", method="full", zero=3, num_gpus=2), "ZeRO-3"),
    (dict(stage="kto", stack="llamafactory", kto_chosen_weight=-1.0), "--kto-chosen-weight"),
    (dict(stage="dpo", stack="llamafactory", pref_loss="ipo"), "--pref-loss"),
])
def test_unmodelled_preference_settings_are_refused(kwargs, message):
    with pytest.raises(VlplanError, match=message):
        make_setup(get_model("qwen2.5-vl-7b"), **kwargs)


def test_kto_is_refused_for_families_it_is_not_traced_on():
    with pytest.raises(VlplanError, match="modelled and traced for qwen2_vl, qwen2_5_vl, llava; gemma3"):
        make_setup(get_model("gemma-3-4b"), stack="llamafactory", stage="kto")


def test_kto_memory_terms():
    """KTO runs four forwards of batch_size rows (DPO one forward of 2 x batch_size with grad and one without): at
    batch 1 its peak is below DPO's and above SFT's; the reference copy of a full fine-tune is counted once; the
    loss phase holds at least five fp32 logits tensors (the policy's saved log_softmax and its chosen / rejected
    copies, the reference's target logits, the KL forward's logits and log_softmax) beside the forward phase."""
    sft = estimate(_setup())
    kto = estimate(_setup(stage="kto"))
    dpo = estimate(_setup(stage="dpo"))
    assert sft.peak_bytes < kto.peak_bytes < dpo.peak_bytes
    logits_bytes = 2048 * get_model("qwen2.5-vl-7b").text.vocab_size * 4
    assert kto.phase_allocated_bytes["loss"] - sft.phase_allocated_bytes["forward"] > 4 * logits_bytes
    full = estimate(_setup(method="full", stage="kto"))
    reference = sum(v for k, v in full.breakdown_bytes.items() if k.startswith("reference/"))
    assert 2 * full.params["total"] <= reference < 2.01 * full.params["total"]
    assert not any(k.startswith("reference/") for k in kto.breakdown_bytes)
    # the weights are Python scalars and the split of desirable rows is fixed: no effect on memory
    weighted = estimate(_setup(stage="kto", kto_chosen_weight=2.0, kto_rejected_weight=0.5))
    assert weighted.peak_bytes == kto.peak_bytes


def test_kto_transcript_is_llamafactorys():
    """The tracer's KTO `forward` and `concatenated_forward` return what LLaMA-Factory's own methods return on the
    same batch: their source is taken from the installed package (the module imports trl, which is not installed)
    and run with a stand-in model whose logits depend on the input ids."""
    torch = pytest.importorskip("torch")
    llamafactory = pytest.importorskip("llamafactory")
    from types import SimpleNamespace

    from vlplan.profiler.preference import _kto_concatenated_forward, kto_inputs

    root = Path(llamafactory.__file__).parent / "train"
    functions = {}
    for path, names in ((root / "trainer_utils.py", ("get_batch_logps", "nested_detach")),
                        (root / "kto" / "trainer.py", ("forward", "concatenated_forward"))):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in names:
                node.returns, node.decorator_list = None, []
                for arg in [*node.args.args, *node.args.kwonlyargs]:
                    arg.annotation = None
                functions[node.name] = node
    namespace = {"torch": torch, "IGNORE_INDEX": -100, "Optional": None, "Union": None, "Mapping": dict,
                 "Literal": None}
    exec(compile(ast.Module(list(functions.values()), []), "llamafactory", "exec"), namespace)
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(50, 50, generator=generator)

    def model(input_ids, **kwargs):
        return SimpleNamespace(logits=table[input_ids] * (2.0 if "pixel_values" in kwargs else 1.0))

    ids = torch.randint(0, 50, (3, 9), generator=generator)
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "labels": labels, "pixel_values": torch.ones(3, 4)}
    kto_inputs(batch)
    batch["kl_input_ids"] = torch.randint(0, 50, (3, 9), generator=generator)
    batch["kl_labels"] = batch["kl_input_ids"].clone()
    trainer = SimpleNamespace()
    trainer.forward = lambda m, b, prefix="": namespace["forward"](trainer, m, b, prefix)
    expected = namespace["concatenated_forward"](trainer, model, batch)
    got = _kto_concatenated_forward(lambda **inputs: model(**inputs), batch)
    assert batch["kto_tags"].tolist() == [True, True, False]
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


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


def test_cli_estimates_and_plans_kto(tmp_path):
    import json

    import yaml
    from typer.testing import CliRunner

    from vlplan.cli.main import app

    runner = CliRunner()
    args = ["--model", "qwen2.5-vl-7b", "--stack", "llamafactory", "--stage", "kto", "--kto-chosen-weight", "1.5"]
    result = runner.invoke(app, ["estimate", *args, "--json"])
    assert result.exit_code == 0, result.output
    settings = json.loads(result.stdout)["settings"]
    assert (settings["stage"], settings["kto_chosen_weight"], settings["kto_rejected_weight"]) == ("kto", 1.5, 1.0)
    text = runner.invoke(app, ["estimate", *args])
    assert text.exit_code == 0 and "stage kto" in text.output
    out = tmp_path / "kto.yaml"
    plan = runner.invoke(app, ["plan", *args, "-g", "8", "--export-llamafactory", str(out), "--json"])
    assert plan.exit_code == 0, plan.output
    data = json.loads(plan.stdout)
    assert data["settings"]["stage"] == "kto" and data["step_time_breakdown_s"]["reference_forward"] > 0
    exported = yaml.safe_load(out.read_text())
    assert (exported["stage"], exported["kto_chosen_weight"], exported["pref_beta"]) == ("kto", 1.5, 0.1)
    assert "pref_loss" not in exported
