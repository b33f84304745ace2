"""benchmarks/lever_chart.py and what it committed (docs/levers.csv, docs/tables.md's lever section): the committed
numbers are what the library computes now (a few rows recomputed), the page is the CSV, and a lever vlplan refuses or
does not model is n/a with the library's own message."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlplan.cli.main import app

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("lever_chart", ROOT / "benchmarks" / "lever_chart.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lever_chart"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


lc = _load()
LEVERS = {lever.key: lever for lever in lc.LEVERS}


@pytest.fixture(scope="module")
def committed():
    return {(r.lever, r.model, r.method, r.seq_len): r for r in lc.read_csv()}


@pytest.mark.parametrize("key", [
    ("offload_checkpoints", lc.PRIMARY_MODEL, "lora", 8192),  # host RAM moves too
    ("zero3", lc.PRIMARY_MODEL, "full", 2048),  # against DDP on 4 GPUs
    ("liger_kernel", lc.PRIMARY_MODEL, "lora", 2048),  # n/a today (not modelled for Qwen2.5-VL): numbers once it is
])
def test_committed_rows_are_recomputed(committed, key):
    lever, model, method, seq_len = key
    assert lc.compute_row(LEVERS[lever], model, method, seq_len) == committed[key], \
        f"docs/levers.csv is stale for {key}: run `{lc.COMMAND}`"


def test_csv_has_every_lever_as_the_script_lists_them(committed):
    rows = list(committed.values())
    primary = {(r.lever, r.method, r.seq_len) for r in rows if r.model == lc.PRIMARY_MODEL}
    assert primary == {(lever, method, seq) for lever in LEVERS for method in lc.METHODS for seq in lc.SEQ_LENS}
    for row in rows:
        lever = LEVERS[row.lever]
        assert row.label == lever.label
        assert row.flags == lc.flags(lc.settings(row.model, row.method, row.seq_len, lever.on))
        assert row.against_flags == lc.flags(lc.settings(row.model, row.method, row.seq_len, lever.against))
        assert (row.peak_bytes is None) == bool(row.na_reason) == (row.against_peak_bytes is None)
    # the fallback model has exactly the levers that are n/a on the primary one (not for a method they skip)
    na = {r.lever for r in rows if r.model == lc.PRIMARY_MODEL and r.na_reason
          and not r.na_reason.startswith(lc.NOT_APPLICABLE)}
    assert {r.lever for r in rows if r.model == lc.FALLBACK_MODEL} == na


def test_tables_md_section_is_the_csv():
    rows = lc.read_csv()
    assert lc.generated_part(lc.TABLES_MD.read_text()) == lc.markdown(rows), f"run `{lc.COMMAND}`"
    assert lc.PNG_PATH.exists()


def test_flags_column_is_a_vlplan_estimate_command(committed, monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    row = committed[("offload_checkpoints", lc.PRIMARY_MODEL, "lora", 2048)]
    result = CliRunner().invoke(app, ["estimate", *row.flags.split(), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["peak_bytes"], data["cpu_ram_bytes"]) == (row.peak_bytes, row.host_bytes)


def test_refused_and_unmodelled_levers_are_na_with_the_library_message():
    refused = lc.Lever("x", "offload without LLaMA-Factory's stack", {"stack": "vlplan", "offload_checkpoints": True})
    row = lc.compute_row(refused, lc.PRIMARY_MODEL, "lora", 2048)
    assert row.peak_bytes is None and row.saved_bytes is None
    assert "use_unsloth_gc; use it with --stack llamafactory" in row.na_reason
    # Liger under the HF Trainer's stack: resolved with a warning (an upper bound), so not a saving
    warned = lc.Lever("y", "Liger, HF Trainer", {"stack": "hf-trainer", "liger_kernel": True}, {"stack": "hf-trainer"})
    row = lc.compute_row(warned, lc.FALLBACK_MODEL, "lora", 2048)
    assert row.peak_bytes is None and row.na_reason.startswith("liger_kernel = True: ")
    assert lc.compute_row(LEVERS["qlora_4bit"], lc.PRIMARY_MODEL, "full", 2048).na_reason == "applies to lora only"


def test_terms_moved_sorts_by_size():
    before = {"a": 10, "b": 5, "c": 1}
    after = {"a": 4, "b": 5, "d": 8}
    assert lc.terms_moved(before, after) == "d:8;a:-6"
