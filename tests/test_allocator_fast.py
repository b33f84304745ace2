"""The default-settings replay (`allocator._replay_default`, every rule inlined) against the object model
(`allocator.replay_model`, `CachingAllocator`): equal results, field for field, on random sequences, under
capacities from the unlimited reserved peak down to where the step runs out of memory, and on simulated steps."""

import pytest

from vlplan.planner.memory.allocator import _replay_default, replay, replay_model
from vlplan.planner.units import MIB

from test_allocator import random_events


@pytest.mark.parametrize("seed", range(6))
def test_default_replay_equals_the_object_model(seed):
    events = random_events(seed, count=4000, largest=(24, 48, 300)[seed % 3] * MIB)
    assert _replay_default(events, None) == replay_model(events)
    assert replay(events) == replay_model(events)


def test_default_replay_under_capacity_equals_the_object_model():
    events = random_events(11, count=2500, largest=24 * MIB)
    unlimited = replay_model(events)
    outcomes = set()
    for capacity in range(unlimited.reserved_peak_bytes + 2 * MIB, unlimited.allocated_peak_bytes - 40 * MIB,
                          -4 * MIB):
        ours, model = _replay_default(events, capacity), replay_model(events, capacity)
        assert ours == model, capacity
        outcomes.add((ours.oom, ours.retries > 0))
    assert outcomes >= {(False, False), (False, True), (True, True)}  # no retry, a saving retry, out of memory


def test_empty_and_free_only_sequences():
    assert _replay_default([], None) == replay_model([])
    assert _replay_default([(1, 0), (2, 0)], None) == replay_model([(1, 0), (2, 0)])


@pytest.mark.slow
@pytest.mark.parametrize("model,kw", [("qwen2.5-vl-7b", dict(method="lora")),
                                      ("llava-1.5-7b", dict(method="qlora", gradient_checkpointing=True)),
                                      ("gemma-3-4b", dict(method="full", batch_size=2))])
def test_default_replay_of_simulated_steps(model, kw, monkeypatch):
    from vlplan.planner.memory import step
    from vlplan.planner.memory.families import base_layer_counts, layer_counts
    from vlplan.planner.memory.sim import recording_allocations
    from vlplan.planner.registry import resolve
    from vlplan.planner.setup import make_setup

    setup = make_setup(resolve(model), **kw)
    counts = base_layer_counts(setup, layer_counts(setup.model), 4)
    with recording_allocations() as logs:
        step.simulate(setup, counts)
    log = logs[0]
    unlimited = replay_model(log)
    assert _replay_default(log, None) == unlimited
    for capacity in (unlimited.reserved_peak_bytes - 64 * MIB, unlimited.allocated_peak_bytes + 2 * MIB,
                     unlimited.allocated_peak_bytes - 2 * MIB):
        assert _replay_default(log, capacity) == replay_model(log, capacity), capacity


# The estimate's replays: under the capacity first ------------------------------------------------------------------


def _squeezed_setups():
    """qwen2-vl-2b LoRA on GPUs from just above the live peak to above the unlimited reserved peak: no retry, retries
    that save the step, and out-of-memory (with plain and expandable segments, one GPU and ZeRO-2 on two)."""
    from dataclasses import replace

    from vlplan.planner.memory import overheads, step
    from vlplan.planner.memory.estimate import estimate
    from vlplan.planner.registry import resolve
    from vlplan.planner.setup import make_setup

    base = make_setup(resolve("qwen2-vl-2b"), method="lora", seq_len=512, image_size=(224, 224))
    step.clear_memos()
    unlimited = estimate(base)
    floor = unlimited.allocated_peak_bytes + 64 * MIB + overheads.CUDA_CONTEXT_BYTES
    setups = []
    for variant in (base, replace(base, expandable_segments=True), replace(base, num_gpus=2, zero=2)):
        for extra_mib in range(-64, (unlimited.peak_bytes - floor) // MIB + 256, 96):
            gpu = replace(base.gpu, memory_mib=floor // MIB + extra_mib)
            setups.append(replace(variant, gpu=gpu))
    return setups


def _answer(result) -> tuple:
    return result.peak_bytes, result.breakdown_bytes, result.allocator, result.fits


@pytest.mark.slow
def test_replay_under_the_capacity_first_gives_the_same_estimates():
    """An estimate whose setup was not replayed yet replays under the GPU's capacity first (one replay where the
    capacity is reached, `estimate._reserved`); the answers equal those of the unlimited replay first, across the
    cases of no retry, a saving retry and out of memory."""
    from vlplan.planner.memory import step
    from vlplan.planner.memory.estimate import estimate, reserved_replay

    setups = _squeezed_setups()
    cold, warm, outcomes = [], [], set()
    for setup in setups:
        step.clear_memos()  # nothing replayed: the capacity-first path
        cold.append(_answer(estimate(setup)))
        step.clear_memos()
        reserved_replay(setup, setup.expandable_segments)  # the unlimited replay first: the plain path
        warm.append(_answer(estimate(setup)))
        outcomes.add((cold[-1][2]["retries"] > 0, cold[-1][2]["oom_event"] is not None))
    step.clear_memos()
    assert cold == warm
    assert outcomes == {(False, False), (True, False), (True, True)}


def _canonical(log: list) -> list:
    """A log with its storage keys numbered by allocation (ids are reused once freed): what a replay reads."""
    live, out = {}, []
    for key, size in log:
        if size:
            live[key] = len(out)
            out.append((len(out), size))
        else:
            out.append((live.pop(key), 0))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model,kw", [
    ("qwen2.5-vl-7b", dict(method="lora")),
    ("qwen2.5-vl-3b", dict(method="full", batch_size=2, zero=2, num_gpus=2)),
    ("qwen2-vl-2b", dict(method="full", stage="dpo", seq_len=1024, stack="llamafactory")),
    ("llava-1.5-7b", dict(method="qlora", gradient_checkpointing=True, optimizer="adafactor", stack="hf-trainer")),
    ("gemma-3-4b", dict(method="freeze", stack="llamafactory", attn="eager", seq_len=2048)),
    ("internvl3-2b", dict(method="full", offload_checkpoints=True, gradient_checkpointing=True,
                          stack="llamafactory")),
])
def test_log_only_simulation_logs_what_the_simulation_does(model, kw):
    """`step.simulate_log` (the estimate's replay input, `sim.LogEngine`: no peak breakdowns) gives the allocation
    log `simulate` records and its largest phase peak."""
    from vlplan.planner.memory import step
    from vlplan.planner.memory.sim import recording_allocations
    from vlplan.planner.registry import resolve
    from vlplan.planner.setup import make_setup

    setup = make_setup(resolve(model), **kw)
    with recording_allocations() as logs:
        result = step.simulate(setup)
    log, live_peak = step.simulate_log(setup)
    assert _canonical(log) == _canonical(logs[0])
    assert live_peak == max(result.phase_peaks.values())
