"""The persistent result cache (planner/cache.py): a warm run reads back what a cold one computed, byte for byte;
corrupt entries, other source versions and a switched-off cache are recomputed; concurrent writers leave whole
entries. Each test has its own cache folder (tests/conftest.py)."""

import json
import multiprocessing
import os

import pytest

from vlplan.planner import cache
from vlplan.planner.hardware import find_gpu
from vlplan.planner.memory import step
from vlplan.planner.memory.estimate import estimate
from vlplan.planner.registry import resolve
from vlplan.planner.setup import make_setup
from vlplan.tables.compute import compute_rows


@pytest.fixture
def count_simulations(monkeypatch):
    calls = []
    inner = step._simulate_extrapolated
    monkeypatch.setattr(step, "_simulate_extrapolated", lambda setup: calls.append(setup) or inner(setup))
    step.clear_memos()
    yield calls
    step.clear_memos()


def _setup():
    return make_setup(resolve("qwen2.5-vl-3b"), method="lora", seq_len=1024, image_size=(448, 448))


def test_warm_estimate_reads_the_cold_simulation_back(count_simulations):
    cold = estimate(_setup()).to_dict()
    assert len(count_simulations) == 1
    assert list(cache.cache_dir().rglob("*.json"))
    step.clear_memos()  # a new process: nothing in memory
    warm = estimate(_setup()).to_dict()
    assert len(count_simulations) == 1  # read back, not simulated
    assert json.dumps(warm, sort_keys=True) == json.dumps(cold, sort_keys=True)


def test_warm_estimate_reads_the_replay_back(count_simulations, monkeypatch):
    """The caching-allocator replay (full-depth simulation + replay, most of a cold plan's time) is stored too: a
    warm estimate runs neither, and its reserve is the cold one."""
    from vlplan.planner.memory import estimate as estimate_module

    full_depth = []
    inner = estimate_module.simulate_log  # the replay's full-depth simulation (step.simulate_log)
    monkeypatch.setattr(estimate_module, "simulate_log", lambda setup: full_depth.append(setup) or inner(setup))
    cold = estimate(_setup()).to_dict()
    assert len(full_depth) == 1
    step.clear_memos()
    warm = estimate(_setup()).to_dict()
    assert len(full_depth) == 1
    assert warm == cold


def test_corrupt_entries_are_recomputed(count_simulations):
    cold = estimate(_setup()).to_dict()
    for path in cache.cache_dir().rglob("*.json"):
        path.write_text(path.read_text()[: len(path.read_text()) // 2])  # truncated mid-write
    step.clear_memos()
    assert estimate(_setup()).to_dict() == cold
    assert len(count_simulations) == 2
    for path in cache.cache_dir().rglob("*.json"):
        path.write_text(json.dumps({"key": "something else", "value": [1, 2, 3]}))
    step.clear_memos()
    assert estimate(_setup()).to_dict() == cold
    assert len(count_simulations) == 3


def test_other_source_and_switched_off_cache_miss(count_simulations, monkeypatch):
    estimate(_setup())
    step.clear_memos()
    monkeypatch.setattr(cache, "source_hash", lambda: "another-version")
    estimate(_setup())
    assert len(count_simulations) == 2  # the other source version's entry is not read
    step.clear_memos()
    monkeypatch.setenv("VLPLAN_NO_CACHE", "1")
    assert cache.cache_dir() is None
    estimate(_setup())
    assert len(count_simulations) == 3


def test_cache_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("VLPLAN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / "vlplan"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / ".cache" / "vlplan"


def _writer(folder: str, index: int) -> None:
    os.environ["VLPLAN_CACHE_DIR"] = folder
    for round_ in range(40):
        cache.store("race", ("one key",), {"writer": index, "round": round_, "payload": [index] * 20000})


def test_concurrent_writers_leave_whole_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPLAN_CACHE_DIR", str(tmp_path))
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    writers = [context.Process(target=_writer, args=(str(tmp_path), i)) for i in range(3)]
    for w in writers:
        w.start()
    seen = 0
    while any(w.is_alive() for w in writers):
        value = cache.load("race", ("one key",))
        if value is not None:  # never a torn entry: a whole value of one writer
            assert value["payload"] == [value["writer"]] * 20000
            seen += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    value = cache.load("race", ("one key",))
    assert value["round"] == 39 and value["payload"] == [value["writer"]] * 20000
    assert not list(tmp_path.rglob(".tmp-*"))  # no temporary file left behind


def test_warm_table_reads_rows_back(count_simulations):
    args = (["qwen2.5-vl-3b"], ["lora", "qlora"], [find_gpu("a100-80g"), find_gpu("t4-16g")], [2048], [(448, 448)])
    cold = compute_rows(*args)
    simulated = len(count_simulations)
    assert simulated
    step.clear_memos()
    warm = compute_rows(*args)
    assert warm == cold
    assert len(count_simulations) == simulated
