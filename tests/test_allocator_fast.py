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
