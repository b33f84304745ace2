"""The FSDP rows of docs/accuracy.md: the estimator's FSDP terms (planner/memory/fsdp.py) against torch's
FSDPMemTracker over `fully_shard` on fake tensors (profiler/fsdp_trace.py), per phase, for the cases of
tests/test_fsdp.py.

    python benchmarks/accuracy_fsdp.py        # prints the markdown table (about a minute on 2 cores)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> int:
    from test_fsdp import ORACLE_CASES, TRACKER_TEMPORARIES, TRACKER_TRANSIENTS, TRANSIENT_KEYS, _estimated
    from tiny import tiny_spec

    from vlplan.planner.memory.fsdp import fsdp_states, single_gpu_optimizer_bytes
    from vlplan.planner.memory.step import simulate_extrapolated
    from vlplan.planner.setup import make_setup
    from vlplan.profiler.fsdp_trace import fsdp_trace

    print("| model (tiny, 3 text layers) | settings | phase | estimate | FSDPMemTracker | error |")
    print("|---|---|---|---:|---:|---:|")
    for name, kw in ORACLE_CASES:
        setup = make_setup(tiny_spec(name, text_layers=3, vision_layers=2), sharding="fsdp", **kw)
        sim = simulate_extrapolated(setup)
        states = fsdp_states(setup, single_gpu_optimizer_bytes(sim.phase_breakdown["optimizer"]))
        traced = fsdp_trace(setup)
        settings = ", ".join(f"{k}={v}" for k, v in kw.items() if k not in ("seq_len", "image_size"))
        for phase, phases in (("forward", ("forward", "loss")), ("backward", ("backward",)),
                              ("optimizer", ("optimizer",))):
            if setup.offload == "all":
                at = traced.phase_at_peak[phase]
                expected = sum(at[k] for k in TRACKER_TRANSIENTS)
                got = max(sum(v for k, v in states.gpu[p].items()
                              if k in TRANSIENT_KEYS and k not in TRACKER_TEMPORARIES) for p in phases)
                what = f"{phase} (GPU buffers)"
            else:
                expected = traced.sharded_states(phase)
                got = max(_estimated(setup, p, states.gpu[p]) for p in phases)
                what = phase
            if not expected:
                continue
            print(f"| {name} | {settings} | {what} | {got / 2**20:.3f} MiB | {expected / 2**20:.3f} MiB | "
                  f"{100 * (got - expected) / expected:+.3f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
