"""The symbolic simulator (planner/memory/symbolic.py) against the concrete one: a pass made at one micro-batch and
sequence length, evaluated wherever its guards hold, must equal `step.simulate` there field for field (and the
allocation log entry for entry); where a guard trips, evaluating anyway must be wrong (the guards are needed)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from vlplan.planner.hardware import CATALOG
from vlplan.planner.memory import estimate as estimate_module
from vlplan.planner.memory import sim, step, symbolic
from vlplan.planner.memory.symbolic import canonical_log, concrete_pass, same_result
from vlplan.planner.memory.families import base_layer_counts, layer_counts
from vlplan.planner.memory.model import _grouped_calls
from vlplan.tables.compute import Conditions, compute_rows, row_setup

MODEL = "qwen2.5-vl-3b"


def gpu(prefix: str):
    return next(g for g in CATALOG if g.name.startswith(prefix))


def table_setup(method: str, image=(448, 448), gpu_prefix="h100", batch=1, seq=2048):
    return replace(row_setup(MODEL, method, seq, image, gpu(gpu_prefix), Conditions()), batch_size=batch, seq_len=seq)


# Polynomials ------------------------------------------------------------------------------------------------------


def test_polynomial_arithmetic_equals_integers_where_guards_hold():
    """Random size expressions (products, roundings to blocks, floor divisions, maxima) built on b and s: wherever the
    trace's guards hold, the polynomial's value is the integer computation's."""
    rng = random.Random(14)
    points = [(b, s) for b in (1, 2, 3, 5, 16) for s in (2048, 4096, 8192, 10240, 2048 + 17)]

    def expression(b, s, k):
        tokens = b * s
        rounded = -(-(tokens * k[0] + b * k[1]) // 512) * 512  # a storage: elements to 512-byte blocks
        lse = tokens // s * (-(-s // 32) * 32) * k[2]  # memory-efficient attention's padded logsumexp
        small = -(-(b * k[3] + 4) // 512) * 512  # a per-sample int64 tensor
        return max(rounded + small, lse * 2 - k[4]) + (tokens * k[5]) // 128

    for _ in range(20):
        k = [rng.randrange(1, 5000) for _ in range(6)]
        for b0, s0 in ((1, 2048), (3, 8192), (2, 2048 + 17)):
            with symbolic._tracing(b0, s0) as trace:
                setup = symbolic.symbolic_setup(table_setup("lora", batch=b0, seq=s0))
                value = expression(setup.batch_size, setup.seq_len, k)
                compiled = symbolic._compiled(value)
                atoms, guards, rho = list(trace.atoms), list(trace.guards.values()), trace.rho
            for b, s in points:
                xy = symbolic.variables(b, s, rho)
                if xy is None:
                    continue
                values = symbolic.slot_values(*xy, atoms)
                if all(symbolic.guard_holds(g, values) for g in guards):
                    assert symbolic._at(compiled, values) == expression(b, s, k), (k, b0, s0, b, s)
            assert symbolic._at(compiled, symbolic.slot_values(*symbolic.variables(b0, s0, rho), atoms)) == \
                expression(b0, s0, k)


@pytest.mark.parametrize("items", [[1024], [64, 64, 64, 36], [36, 64, 64], [64, 16, 64, 16, 4], [100, 100]])
def test_repeated_segments_group_like_the_concrete_list(items):
    """model.py `_grouped_calls` of a symbolic repetition `items * b` equals `_grouped_calls(items * b)` at every b
    where the trace's guards hold (the concrete function is the oracle)."""
    out_bytes, lse_bytes = (lambda n: n * 1280 * 2), (lambda n: n * 16 * 4)
    for b0 in (1, 2, 3):
        with symbolic._tracing(b0, 2048) as trace:
            batch = symbolic.symbolic_setup(table_setup("lora", batch=b0)).batch_size
            groups = [(length, symbolic._compiled(calls)) for length, calls in
                      _grouped_calls(items * batch, out_bytes, lse_bytes)]
            atoms, guards, rho = list(trace.atoms), list(trace.guards.values()), trace.rho
        held = []
        for b in range(1, 9):
            values = symbolic.slot_values(*symbolic.variables(b, 2048, rho), atoms)
            if all(symbolic.guard_holds(g, values) for g in guards):
                held.append(b)
                assert [(length, symbolic._at(calls, values)) for length, calls in groups] == \
                    _grouped_calls(items * b, out_bytes, lse_bytes)
        assert b0 in held
        if b0 >= 2:
            assert held == list(range(2, 9)), held  # one pass serves every micro-batch from 2 on


# Passes ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "freeze"])
@pytest.mark.parametrize("image", [(448, 448), (1920, 1080)])
def test_symbolic_pass_equals_concrete_passes(method, image):
    """A 2-and-3-layer pass (the extrapolation's) at micro-batch 1 and at 2, sequence 2048, evaluated at micro-batches
    1-7 and sequences 2048 and 8192: exact wherever its guards hold; the pass at 2 serves every micro-batch from 2 on
    at both lengths, the pass at 1 only micro-batch 1 (one attention call per sample's image: a group of b - 1 calls
    that is empty at 1)."""
    setup = table_setup(method, image)
    counts = base_layer_counts(setup, layer_counts(setup.model))
    for b0 in (1, 2):
        symbolic_pass = symbolic.symbolic_simulate(replace(setup, batch_size=b0), counts)
        held = []
        for b in (1, 2, 3, 7):
            for s in (2048, 8192):
                if symbolic_pass.holds(b, s):
                    held.append((b, s))
                    expected, _ = concrete_pass(replace(setup, batch_size=b, seq_len=s), counts)
                    assert same_result(symbolic_pass.evaluate(b, s), expected), (method, image, b0, b, s)
        expected_held = [(1, 2048), (1, 8192)] if b0 == 1 else [(b, s) for b in (2, 3, 7) for s in (2048, 8192)]
        assert held == expected_held


def test_full_depth_pass_and_allocation_log_are_exact():
    """The full-depth pass the caching-allocator replay reads: results and the allocation log (as the replay sees it)
    from one symbolic pass at micro-batch 2 equal the concrete ones at micro-batches 2, 5 and 16, sequences 2048 and
    8192; the replay of the evaluated log equals the replay of the concrete log."""
    setup = table_setup("lora", (768, 768), "a100", batch=2)
    symbolic_pass = symbolic.symbolic_simulate(setup, None, log=True)
    for b, s in ((2, 2048), (5, 8192), (16, 2048)):
        assert symbolic_pass.holds(b, s)
        expected, log = concrete_pass(replace(setup, batch_size=b, seq_len=s), None, logged=True)
        evaluated = symbolic_pass.evaluate_log(b, s)
        assert same_result(symbolic_pass.evaluate(b, s), expected)
        assert canonical_log(evaluated) == canonical_log(log)
    assert estimate_module.replay(evaluated) == estimate_module.replay(log)


def test_tripped_guards_are_needed():
    """Evaluating a pass where its guards trip gives a wrong answer: the full-depth pass at micro-batch 1 evaluated at
    2 and 3 gives another allocation log than the concrete simulation there (at 1 each sample's image is one
    attention call; from 2 on the calls are grouped: b - 1 of them, then the last), so a test that only checked where
    the guards hold could not pass with vacuous guards."""
    setup = table_setup("full", (1920, 1080), "a100")
    symbolic_pass = symbolic.symbolic_simulate(setup, None, log=True)
    for b in (2, 3):
        assert not symbolic_pass.holds(b, 2048)
        _, log = concrete_pass(replace(setup, batch_size=b), None, logged=True)
        assert canonical_log(symbolic_pass.evaluate_log(b, 2048)) != canonical_log(log)


def test_sequence_lengths_off_the_granule_are_their_own_pass():
    """s = 2048 * sigma + rho: a pass at 2048 does not serve 3000 (another rho); a pass at 3000 serves 3000 + 2048k
    where its guards hold, exactly."""
    setup = table_setup("lora", (448, 448), batch=2)
    counts = base_layer_counts(setup, layer_counts(setup.model))
    assert not symbolic.symbolic_simulate(setup, counts).holds(2, 3000)
    symbolic_pass = symbolic.symbolic_simulate(replace(setup, seq_len=3000), counts)
    for b, s in ((2, 3000), (4, 5048), (3, 7096)):
        if symbolic_pass.holds(b, s):
            expected, _ = concrete_pass(replace(setup, batch_size=b, seq_len=s), counts)
            assert same_result(symbolic_pass.evaluate(b, s), expected)


@pytest.mark.slow
def test_table_subset_every_visited_pass_is_exact(monkeypatch):
    """The table's own visits (a subset of the Qwen2.5-VL matrix: the 3B with LoRA on two GPU types, one running
    FlashAttention-2 in bf16, one memory-efficient attention in fp16, both sequence lengths): every concrete pass the
    table makes, recomputed from a symbolic pass shared across micro-batches and sequence lengths (a new pass only
    where no earlier one's guards hold), equals a fresh concrete pass; and the sharing is real (fewer symbolic
    passes)."""
    monkeypatch.setenv("VLPLAN_NO_CACHE", "1")
    calls = []
    simulate, simulate_log = step.simulate, estimate_module.simulate_log

    def recorded(setup, counts=None, detail=False):
        calls.append((setup, None if counts is None else dict(counts), sim._ALLOCATION_LOGS.get() is not None))
        return simulate(setup, counts, detail)

    def recorded_log(setup):  # the replay's full-depth pass: simulate's allocation log (step.simulate_log)
        calls.append((setup, None, True))
        return simulate_log(setup)

    monkeypatch.setattr(step, "simulate", recorded)
    monkeypatch.setattr(estimate_module, "simulate_log", recorded_log)
    step.clear_memos()
    compute_rows([MODEL], ["lora"], [gpu("a100-80"), gpu("t4")], [2048, 8192], [(768, 768)])
    monkeypatch.setattr(step, "simulate", simulate)
    monkeypatch.setattr(estimate_module, "simulate_log", simulate_log)
    passes: dict = {}
    built = 0
    for setup, counts, logged in calls:
        key = (tuple(item for item in step.simulation_key(setup) if item[0] not in ("batch_size", "seq_len")),
               None if counts is None else tuple(sorted(counts.items())), logged)
        b, s = setup.batch_size, setup.seq_len
        chosen = next((p for p in passes.get(key, []) if p.holds(b, s)), None)
        if chosen is None:
            chosen = symbolic.symbolic_simulate(setup, counts, log=logged)
            passes.setdefault(key, []).append(chosen)
            built += 1
        expected, log = concrete_pass(setup, counts, logged)
        assert same_result(chosen.evaluate(b, s), expected), (setup.method, setup.gpu.name, b, s, counts)
        if logged:
            assert canonical_log(chosen.evaluate_log(b, s)) == canonical_log(log)
    assert any(logged for *_, logged in calls)
    assert built * 2 < len(calls), (built, len(calls))
