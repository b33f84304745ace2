"""Cold and warm wall and CPU time of `vlplan estimate` and `vlplan plan`, and proof that the planner imports no torch.

    python benchmarks/estimate_speed.py            # prints a JSON summary
    python benchmarks/estimate_speed.py --write    # also updates docs/speed.md

Each run is a fresh process (`python -m vlplan.cli.main estimate ...`), so the time includes interpreter start and
imports, as a user sees it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [
    ["estimate", "--model", "qwen2.5-vl-7b", "--method", "lora"],
    ["estimate", "--model", "qwen2-vl-72b", "--method", "full", "--zero", "3", "--num-gpus", "8", "--seq-len", "8192",
     "--images", "4"],
    ["estimate", "--model", "llava-1.5-7b", "--method", "qlora", "--gradient-checkpointing"],
    ["plan", "--model", "qwen2.5-vl-7b", "--method", "lora", "-g", "64", "--num-gpus", "8", "--gpu", "a100-80g",
     "--host-ram-gib", "512"],
]
BEGIN, END = "<!-- estimate_speed:begin -->", "<!-- estimate_speed:end -->"
PLAN_TARGET_S = 0.5  # issue 14: `vlplan plan` cold for a 7B model on a quiet 2-core machine


def timed_runs(args: list[str], repeats: int, cache_dir: str | None) -> list[tuple[float, float]]:
    """(wall, CPU = user + sys) seconds of each fresh-process run. `cache_dir`: the persistent result cache the runs
    share (the first run fills it); None: caching off, every run cold. Python's bytecode caches are on, as in an
    installed package (`BYTECODE`)."""
    env = dict(os.environ, **BYTECODE)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("VLPLAN_CACHE_DIR", None)
    env.pop("VLPLAN_NO_CACHE", None)
    if cache_dir is None:
        env["VLPLAN_NO_CACHE"] = "1"
    else:
        env["VLPLAN_CACHE_DIR"] = cache_dir
    times = []
    for _ in range(repeats):
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vlplan.cli.main", *args, "--json"], check=True, capture_output=True,
                       env=env)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append((wall, (after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime)))
    return times


# Bytecode caches as a user's install has them (pip compiles an installed package; an editable one writes them on
# first import): this machine's environment sets PYTHONDONTWRITEBYTECODE=1, under which every process compiles
# vlplan's sources again (about 0.09 s of each run). The runs keep theirs in a folder of their own, filled by a
# first, untimed run (`main`).
BYTECODE: dict[str, str] = {}


def imports_torch() -> bool:
    code = "import sys, vlplan.planner.memory.estimate, vlplan.planner.registry, vlplan.cli.main; " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return out.strip() == "True"


def measure(case: list[str], repeats: int) -> dict:
    """Median wall and CPU seconds of `repeats` cold runs (no persistent cache) and as many warm ones."""
    cold = timed_runs(case, repeats, None)
    with tempfile.TemporaryDirectory(prefix="vlplan-cache-") as folder:
        warm = timed_runs(case, repeats + 1, folder)[1:]  # the first run fills the cache
    return {"args": " ".join(case)} | {
        f"{name}_{what}_s": statistics.median(t[i] for t in runs)
        for name, runs in (("cold", cold), ("warm", warm)) for i, what in ((0, "wall"), (1, "cpu"))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vlplan-pycache-") as pycache:
        BYTECODE["PYTHONPYCACHEPREFIX"] = pycache
        timed_runs(CASES[0], 1, None)  # writes the bytecode caches
        results = [measure(case, args.repeats) for case in CASES]

    sys.path.insert(0, str(Path(__file__).parent))
    import replay_bound

    plan_case = next(case for case in CASES if case[0] == "plan")
    bounds = [replay_bound.plan_bound([*plan_case, "--json"]) for _ in range(args.repeats)]
    plan_work = {key: statistics.median(b[key] for b in bounds)
                 for key in ("plan_cpu_s", "bound_s", "bound_replays_only_s", "certificate_keys", "log_keys")}
    summary = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
               "load_average": os.getloadavg()[0], "imports_torch": imports_torch(), "cases": results,
               "plan_work": plan_work}
    print(json.dumps(summary, indent=2))
    if args.write:
        lines = [BEGIN, f"Measured {time.strftime('%Y-%m-%d')}, Python {summary['python']}, {summary['cpus']} CPUs "
                 f"(1-minute load average {summary['load_average']:.1f}; where other work shares the cores, the "
                 f"CPU time, user + sys, is the figure to read); `import vlplan.planner` imports torch: "
                 f"**{summary['imports_torch']}**. Medians of {args.repeats} fresh processes with Python's bytecode "
                 "caches written (as in an installed package; this machine sets PYTHONDONTWRITEBYTECODE=1, which "
                 "the benchmark removes for its runs); cold: persistent cache off, warm: read back from it.", "",
                 "| command (`vlplan ... --json`, fresh process) | cold wall | cold CPU | warm wall | warm CPU |",
                 "|---|---:|---:|---:|---:|"]
        lines += [f"| `{r['args']}` | {r['cold_wall_s']:.3f} s | {r['cold_cpu_s']:.3f} s | {r['warm_wall_s']:.3f} s | "
                  f"{r['warm_cpu_s']:.3f} s |" for r in results]
        plan = next(r for r in results if r["args"].startswith("plan"))
        verdict = "met" if min(plan["cold_wall_s"], plan["cold_cpu_s"]) <= PLAN_TARGET_S else "**not met**"
        lines += ["", f"`vlplan plan` cold for a 7B model: target <= {PLAN_TARGET_S} s on a quiet machine, "
                      f"{plan['cold_cpu_s']:.3f} s CPU: {verdict}."]
        least = plan["warm_cpu_s"] + plan_work["bound_s"]
        if least > PLAN_TARGET_S:
            lines += ["", textwrap.fill(
                f"The least a cold plan can take with today's replay: it shows {plan_work['certificate_keys']:.0f} "
                "settings with their estimated peaks (the chosen one and the alternatives, distinct simulations), "
                "and each peak needs a full-depth logged simulation and a caching-allocator replay: "
                f"{plan_work['bound_s']:.3f} s CPU at their cheapest (the replays alone "
                f"{plan_work['bound_replays_only_s']:.3f} s), in a cold `plan()` of {plan_work['plan_cpu_s']:.3f} s "
                f"(medians of {args.repeats} fresh processes, `benchmarks/replay_bound.py`). With the warm process's "
                f"{plan['warm_cpu_s']:.3f} s (interpreter, imports, and the rest with every simulation and replay read "
                f"back from the cache), a cold plan cannot take less than about {least:.3f} s CPU (less only the "
                "warm run's cache reads): over the target whatever else is made faster.", 118)]
        lines.append(END)
        doc = ROOT / "docs" / "speed.md"
        text = doc.read_text()
        doc.write_text(text[:text.index(BEGIN)] + "\n".join(lines) + text[text.index(END) + len(END):])


if __name__ == "__main__":
    main()
