"""How each component trains, from the CLI: `--vision frozen|lora|full --projector frozen|full --language
frozen|lora|full|freeze` over the method presets (ms-swift's lora_llm_full_vit among them), contradictions refused in
one line, and the LLaMA-Factory export of each combination (read back the same, or refused where LLaMA-Factory cannot
express it)."""

from __future__ import annotations

import itertools
import json

import pytest
from typer.testing import CliRunner

from vlplan.cli.main import app
from vlplan.planner.errors import VlplanError
from vlplan.planner.io.llamafactory import llamafactory_yaml, setup_from_llamafactory
from vlplan.planner.memory.step import simulate
from vlplan.planner.registry import resolve
from vlplan.planner.setup import COMPONENT_MODES, implied_method, make_setup

from tiny import assert_phases_match, tiny_spec

MODEL = "qwen2.5-vl-7b"


def _settings(args: list[str]) -> dict:
    result = CliRunner().invoke(app, ["estimate", "--model", MODEL, *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["settings"]


@pytest.mark.parametrize("args, method, modes", [
    (["--vision", "full", "--projector", "full"], "lora", ("full", "full", "lora")),  # lora_llm_full_vit
    (["--language", "lora", "--vision", "full", "--projector", "full"], "lora", ("full", "full", "lora")),
    (["--language", "full", "--vision", "full"], "full", ("full", "frozen", "full")),
    (["--language", "frozen", "--vision", "lora"], "lora", ("lora", "frozen", "frozen")),
    (["--language", "frozen", "--projector", "full"], "full", ("frozen", "full", "frozen")),
    (["--language", "freeze"], "freeze", ("frozen", "frozen", "full")),
    (["--method", "qlora", "--vision", "full"], "qlora", ("full", "frozen", "lora")),
    (["--method", "full", "--train-vision", "--vision", "full"], "full", ("full", "frozen", "full")),
])
def test_modes_from_the_cli(args, method, modes):
    settings = _settings(args)
    assert (settings["method"], settings["vision"], settings["projector"], settings["language"]) == (method, *modes)


@pytest.mark.parametrize("args, message", [
    (["--train-vision", "--vision", "frozen"], "--train-vision contradicts --vision frozen"),
    (["--freeze-projector", "--projector", "full"], "--freeze-projector contradicts --projector full"),
    (["--freeze-llm", "--language", "lora"], "--freeze-llm contradicts --language lora"),
    (["--train-llm", "--language", "frozen"], "--train-llm contradicts --language frozen"),
    (["--method", "lora", "--language", "freeze"], "--language freeze trains the last language-model layers"),
    (["--method", "full", "--vision", "lora"], "--method full has no LoRA adapters"),
    (["--method", "lora", "--language", "full"], "--method lora trains the language model with adapters"),
    (["--projector", "lora"], "--projector 'lora' is not one of frozen, full"),
    (["--language", "frozen"], "nothing trains"),
])
def test_contradictions_are_refused_in_one_line(args, message):
    result = CliRunner().invoke(app, ["estimate", "--model", MODEL, *args])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert message in result.output and "Traceback" not in result.output


def test_a_flag_wins_over_the_yaml_preset(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(f"model_name_or_path: {MODEL}\nfinetuning_type: lora\nfreeze_vision_tower: true\nbf16: true\n")
    result = CliRunner().invoke(app, ["estimate", "--from-llamafactory", str(config), "--vision", "lora", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["vision"] == "lora"


COMBINATIONS = list(itertools.product(COMPONENT_MODES["vision"], COMPONENT_MODES["projector"],
                                      COMPONENT_MODES["language"]))


@pytest.mark.parametrize("vision, projector, language", COMBINATIONS)
def test_every_combination_exports_to_llamafactory_or_is_refused(vision, projector, language):
    method = implied_method(vision, projector, language) or "lora"
    try:
        setup = make_setup(resolve(MODEL), method=method, vision=vision, projector=projector, language=language)
    except VlplanError:
        return  # nothing trains, or LoRA next to a full language model / no adapters with a LoRA vision tower
    if method == "lora" and vision == "full":
        with pytest.raises(VlplanError, match="LLaMA-Factory cannot train the vision tower in full next to LoRA"):
            llamafactory_yaml(setup)
        return
    back, _ = setup_from_llamafactory(llamafactory_yaml(setup))
    assert (back.method, back.vision, back.projector, back.language) == (setup.method, setup.vision,
                                                                         setup.projector, setup.language)


@pytest.mark.slow
def test_lora_llm_full_vit_matches_trace():
    pytest.importorskip("transformers")
    from vlplan.profiler.trace import run_trace

    setup = make_setup(tiny_spec("qwen2.5-vl-3b"), vision="full", projector="full", seq_len=256,
                       image_size=(112, 112))
    assert (setup.method, setup.vision.value, setup.language.value) == ("lora", "full", "lora")
    assert_phases_match(simulate(setup), run_trace(setup))
