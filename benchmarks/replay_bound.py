"""Where a cold table's or plan's time goes, and the least work any exact answer needs with today's replay.

Used by benchmarks/tables_speed.py (its serial cold run, in the process that computes the rows) and
benchmarks/estimate_speed.py (a cold `plan()` in a fresh process, `plan_bound`):

- `instrument()` times the table's work by kind: the 2-and-3-layer simulations of the extrapolation
  (`step._simulate_extrapolated`), the full-depth simulations that log the step's allocations (`estimate._step_log`,
  one per simulation key unless evicted from its 4-entry memo) and the caching-allocator replays
  (`estimate.replay`), per simulation key.
- `certificate(rows, conditions)` lists, for the rows computed, the setups whose full estimate (with its replay) any
  exact algorithm has to compute, because nothing cheaper decides them: each row's micro-batch 1 (its peak is a
  column); the largest micro-batch found, where it is 2 or more (only the replay shows it fits); the one above it,
  unless its replay-free lower bound (`peak_floor_bytes`) is over the budget already; and, in the fewest-GPU
  searches, every candidate before the answer whose lower bound fits (only a replay shows it does not) and the
  answer. The offloading search counts only GPU counts below the answer without offload (the row shows offload
  only where it needs fewer GPUs).
- `plan_certificate(result)`: the same for a plan: the chosen settings and the alternatives it shows, each with its
  estimated peak (so each with its replay).
- `summary(work, keys, rows)`: the tally, and the certificate's cost (`bound_s`; `bound_replays_only_s` without
  the logged simulations, as if a log cost nothing) at today's prices: one full-depth logged simulation and one replay
  (the cheapest measured) per distinct simulation key, nothing else (no 2-and-3-layer simulation, no search, no
  row arithmetic): a lower bound of any exact table built on this replay.
"""

from __future__ import annotations

import time
from dataclasses import replace


def instrument(patch=setattr) -> dict:
    """Wrap the simulator's and the replay's entry points to time them (in this process); returns the tally.
    `patch(module, name, value)` installs each wrapper (a test passes pytest's `monkeypatch.setattr` to undo them)."""
    from vlplan.planner.memory import estimate as est
    from vlplan.planner.memory import step

    work = {"shallow": [0, 0.0], "log": {}, "replay": {}}
    current = [None]  # the simulation key whose reserve `_reserved` is computing: the replays it runs are its own
    shallow, step_log, reserved, replay = step._simulate_extrapolated, est._step_log, est._reserved, est.replay

    def timed_shallow(setup):
        start = time.perf_counter()
        try:
            return shallow(setup)
        finally:
            work["shallow"][0] += 1
            work["shallow"][1] += time.perf_counter() - start

    def timed_log(setup, sim_key):
        if sim_key in est._LOGS:
            return step_log(setup, sim_key)
        start = time.perf_counter()
        result = step_log(setup, sim_key)
        work["log"].setdefault(sim_key, []).append(time.perf_counter() - start)
        return result

    def keyed_reserved(setup, *args):
        outer, current[0] = current[0], step.simulation_key(setup)
        try:
            return reserved(setup, *args)
        finally:
            current[0] = outer

    def timed_replay(log, *args, **kwargs):
        if len(log) <= 2:  # the cuBLAS workspaces' segments (`cublas_reserved_bytes`), not the step
            return replay(log, *args, **kwargs)
        start = time.perf_counter()
        try:
            return replay(log, *args, **kwargs)
        finally:
            work["replay"].setdefault(current[0], []).append(time.perf_counter() - start)

    for module, name, value in ((step, "_simulate_extrapolated", timed_shallow), (est, "_step_log", timed_log),
                                (est, "_reserved", keyed_reserved), (est, "replay", timed_replay)):
        patch(module, name, value)
    return work


def certificate(rows, conditions) -> set:
    """The simulation keys of the setups every exact computation of `rows` has to replay (module docstring)."""
    from vlplan.planner.memory.step import simulation_key

    return {(simulation_key(s), s.expandable_segments) for s, _, _ in certificate_setups(rows, conditions)}


def certificate_setups(rows, conditions) -> list[tuple]:
    """(setup, budget, what its replay decides) for the certificate of `rows`: "peak" (a row's micro-batch 1, shown),
    "fits" (its peak is within the budget: the largest micro-batch, a fewest-GPU answer) or "over" (its lower bound
    fits but its peak does not: the micro-batch above the largest, a fewest-GPU candidate before the answer)."""
    from vlplan.planner.errors import VlplanError
    from vlplan.planner.hardware import find_gpu
    from vlplan.planner.memory.estimate import peak_floor_bytes
    from vlplan.tables import compute

    needed = []
    for row in rows:
        if row.note:  # refused setups: no estimate
            continue
        gpu = find_gpu(row.gpu)
        size = None if row.image_size == "-" else tuple(int(v) for v in row.image_size.split("x"))
        setup = compute.row_setup(row.model, row.method, row.seq_len, size, gpu, conditions)
        budget = int(gpu.memory_bytes * (1 - conditions.margin))
        needed.append((setup, budget, "peak"))
        largest = row.max_micro_batch
        if largest is not None:
            if largest >= 2:
                needed.append((replace(setup, batch_size=largest), budget, "fits"))
            if largest < compute.MAX_MICRO_BATCH:
                try:
                    above = replace(setup, batch_size=largest + 1)
                except VlplanError:
                    above = None
                if above is not None and peak_floor_bytes(above) <= budget:
                    needed.append((above, budget, "over"))
        for offload, answer, below in ((False, (row.fewest_gpus, row.strategy), None),
                                       (True, (row.fewest_gpus_offload, row.strategy_offload), row.fewest_gpus)):
            candidates = _fewest_candidates(setup, budget, offload, answer, below)
            found = bool(candidates) and answer[0] is not None and candidates[-1][1] == answer
            needed += [(c, budget, "fits" if found and i == len(candidates) - 1 else "over")
                       for i, (c, _) in enumerate(candidates)]
    return needed


def _fewest_candidates(setup, budget: int, offload: bool, answer: tuple, below: int | None) -> list:
    """The candidates of `compute._fewest_gpus` that a replay has to decide, each with its (GPU count, strategy):
    those before the answer (or all, when none fits) whose lower bound fits the budget, and the answer; with
    `below`, only GPU counts under it."""
    from vlplan.planner.memory.estimate import peak_floor_bytes
    from vlplan.tables import compute

    out = []
    for count, name, candidate in compute.fewest_gpu_candidates(setup, offload):
        if below is not None and count >= below:
            break
        if peak_floor_bytes(candidate) > budget:
            continue
        out.append((candidate, (count, name)))
        if (count, name) == answer:
            break
    return out


def summary(work: dict, keys: set, rows: int) -> dict:
    """The tally in seconds and counts, and the certificate's cost (`bound_s`)."""
    logs = work["log"]
    replays = work["replay"]
    missing = [k for k in keys if k[0] not in logs or k[0] not in replays]
    measured = [k for k in {k[0] for k in keys} if k in logs and k in replays]
    bound_s = sum(min(logs[k]) + min(replays[k]) for k in measured)
    replays_only_s = sum(min(replays[k]) for k in measured)
    return {"shallow_simulations": work["shallow"][0], "shallow_s": work["shallow"][1],
            "logged_simulations": sum(len(v) for v in logs.values()), "log_keys": len(logs),
            "log_s": sum(sum(v) for v in logs.values()),
            "replays": sum(len(v) for v in replays.values()), "replay_s": sum(sum(v) for v in replays.values()),
            "certificate_keys": len({k[0] for k in keys}), "certificate_unmeasured": len(missing),
            "bound_s": bound_s, "bound_replays_only_s": replays_only_s, "rows": rows}


def plan_certificate(result) -> set:
    """The simulation keys of the candidates a plan shows with their peaks (the chosen one and the alternatives)."""
    from vlplan.planner.memory.step import simulation_key

    return {(simulation_key(c.setup), c.setup.expandable_segments) for c in [result.chosen, *result.alternatives]}


# A cold `plan()` in a fresh process (argv: the CLI's plan arguments), instrumented; prints `summary` with its CPU time
PLAN_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import replay_bound
from typer.testing import CliRunner
import vlplan.cli.main as main
import vlplan.cli.plan as cli_plan

work, captured = replay_bound.instrument(), {}
inner = cli_plan.plan

def plan(*args, **kwargs):
    start = time.process_time()
    captured["plan"] = inner(*args, **kwargs)
    captured["cpu_s"] = time.process_time() - start
    return captured["plan"]

cli_plan.plan = plan
outcome = CliRunner().invoke(main.app, sys.argv[2:])
assert outcome.exit_code == 0, outcome.output
out = replay_bound.summary(work, replay_bound.plan_certificate(captured["plan"]), 0)
print(json.dumps(out | {"plan_cpu_s": captured["cpu_s"]}))
"""


def plan_bound(args: list[str]) -> dict:
    """`PLAN_CHILD` in a fresh process with the persistent cache off."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, VLPLAN_NO_CACHE="1")
    out = subprocess.run([sys.executable, "-c", PLAN_CHILD, str(Path(__file__).parent), *args], check=True,
                         capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])
