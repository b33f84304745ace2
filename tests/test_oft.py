"""OFT from the command line and through saved settings: the flags reach the estimate, contradictory or foreign
settings are one-line errors, and a plan's settings read back as the same setup."""

import json

import pytest
from typer.testing import CliRunner

from vlplan.cli.main import app
from vlplan.planner.errors import VlplanError
from vlplan.planner.registry import resolve
from vlplan.planner.setup import OftSettings, make_setup
from vlplan.runner.job import setup_from_settings

runner = CliRunner()
MODEL = ["--model", "qwen2-vl-2b", "--seq-len", "1024"]


def _estimate(*args: str) -> dict:
    result = runner.invoke(app, ["estimate", *MODEL, *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_oft_flags_reach_the_estimate():
    default = _estimate("--method", "oft")
    assert default["settings"]["method"] == "oft"
    assert default["settings"]["oft"] == {"rank": 0, "block_size": 32, "module_dropout": 0.0}
    smaller = _estimate("--method", "oft", "--oft-block-size", "16")
    ranked = _estimate("--method", "oft", "--oft-rank", "4")
    assert ranked["settings"]["oft"]["block_size"] == 0  # --oft-rank alone: peft takes one of the two
    # fewer, smaller blocks: b(b-1)/2 parameters per block of b inputs
    assert smaller["trainable_params"]["total"] < default["trainable_params"]["total"]
    assert ranked["trainable_params"]["total"] > default["trainable_params"]["total"]
    assert default["peak_bytes"] != _estimate("--method", "lora")["peak_bytes"]
    assert "oft" not in _estimate("--method", "lora")["settings"]  # other methods' records stay as they were


@pytest.mark.parametrize("args, message", [
    (["--method", "lora", "--oft-rank", "8"], "OFT settings; use them with --method oft"),
    (["--method", "oft", "--lora-rank", "16"], "--lora-rank applies to LoRA adapters"),
    (["--method", "oft", "--oft-rank", "8", "--oft-block-size", "16"], "either --oft-rank or --oft-block-size"),
    (["--method", "oft", "--oft-block-size", "-4"], "must be 0 or positive"),
    (["--method", "oft", "--module-dropout", "1.0"], r"--module-dropout must be in \[0, 1\)"),
    (["--method", "oft", "--num-gpus", "2", "--sharding", "fsdp"], "OFT under FSDP is not modelled"),
])
def test_bad_oft_settings_are_one_line_errors(args, message):
    result = runner.invoke(app, ["estimate", *MODEL, *args])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert pytest.importorskip("re").search(message, result.output), result.output


def test_dora_and_lora_rank_are_refused_with_oft_in_the_library():
    with pytest.raises(VlplanError, match="LoRA settings, but --method oft"):
        make_setup(resolve("qwen2-vl-2b"), method="oft", dora=True)


def test_saved_settings_read_back_as_the_same_oft_setup():
    setup = make_setup(resolve("qwen2-vl-2b"), method="oft", oft_rank=4, module_dropout=0.1, lora_target="q_proj")
    assert setup_from_settings(setup.describe(), setup.model) == setup
    assert setup.oft == OftSettings(rank=4, block_size=0, module_dropout=0.1)
