"""benchmarks/replay_bound.py: the least work an exact table needs, which docs/speed.md states as the reason the cold
table target is out of reach. Its certificate has to be what the rows' own estimates decide (a setup it counts as
fitting fits, one it counts as over is over although its replay-free lower bound fits), and every setup in it has to
be one the table computation really logs and replays; otherwise the bound would be a number about other work."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from vlplan.planner.hardware import find_gpu
from vlplan.planner.memory import step
from vlplan.planner.memory.estimate import estimate, peak_floor_bytes
from vlplan.tables.compute import Conditions, compute_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def replay_bound():
    spec = importlib.util.spec_from_file_location("replay_bound", ROOT / "benchmarks" / "replay_bound.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# small GPUs and large ones: rows whose micro-batch search ends inside the range, rows that need several GPUs, and
# offloading; two methods of a small model keep it quick
GPUS = ["t4-16g", "l4-24g", "a100-80g"]


@pytest.fixture
def table(replay_bound, monkeypatch):
    monkeypatch.setenv("VLPLAN_NO_CACHE", "1")
    step.clear_memos()  # the table computes its simulations here, not from another test's memos
    work = replay_bound.instrument(monkeypatch.setattr)
    rows = compute_rows(["qwen2-vl-2b"], ["full", "lora"], [find_gpu(g) for g in GPUS], [2048], [(768, 768)])
    yield rows, work
    step.clear_memos()


def test_certificate_is_what_the_estimates_decide(replay_bound, table):
    rows, _ = table
    setups = replay_bound.certificate_setups(rows, Conditions())
    roles = {role for _, _, role in setups}
    assert roles == {"peak", "fits", "over"}, roles  # the selection exercises every kind
    for setup, budget, role in setups:
        peak = estimate(setup).peak_bytes
        if role == "fits":
            assert peak <= budget, setup
        elif role == "over":  # the lower bound cannot decide it: only the replay shows it does not fit
            assert peak_floor_bytes(setup) <= budget < peak, setup


def test_certificate_is_work_the_table_does(replay_bound, table):
    rows, work = table
    keys = replay_bound.certificate(rows, Conditions())
    out = replay_bound.summary(work, keys, len(rows))
    assert out["certificate_unmeasured"] == 0
    assert 0 < out["certificate_keys"] <= out["log_keys"]
    assert out["certificate_keys"] <= out["replays"]
    assert 0 < out["bound_replays_only_s"] < out["bound_s"] <= out["log_s"] + out["replay_s"]
