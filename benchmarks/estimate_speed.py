"""Cold wall time of `vlplan estimate` and proof that the planner imports no torch.

    python benchmarks/estimate_speed.py            # prints a JSON summary
    python benchmarks/estimate_speed.py --write    # also updates docs/speed.md

Each run is a fresh process (`python -m vlplan.cli.main estimate ...`), so the time includes interpreter start and
imports, as a user sees it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [
    ["--model", "qwen2.5-vl-7b", "--method", "lora"],
    ["--model", "qwen2-vl-72b", "--method", "full", "--zero", "3", "--num-gpus", "8", "--seq-len", "8192",
     "--images", "4"],
    ["--model", "llava-1.5-7b", "--method", "qlora", "--gradient-checkpointing"],
]
BEGIN, END = "<!-- estimate_speed:begin -->", "<!-- estimate_speed:end -->"


def cold_seconds(args: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vlplan.cli.main", "estimate", *args, "--json"], check=True,
                       capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def imports_torch() -> bool:
    code = "import sys, vlplan.planner.memory.estimate, vlplan.planner.registry, vlplan.cli.main; " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return out.strip() == "True"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    results = []
    for case in CASES:
        times = cold_seconds(case, args.repeats)
        results.append({"args": " ".join(case), "median_s": statistics.median(times), "max_s": max(times)})
    summary = {"python": platform.python_version(), "machine": platform.machine(), "cpus": __import__("os").cpu_count(),
               "imports_torch": imports_torch(), "cases": results}
    print(json.dumps(summary, indent=2))
    if args.write:
        lines = [BEGIN, f"Measured {time.strftime('%Y-%m-%d')}, Python {summary['python']}, {summary['cpus']} CPUs; "
                 f"`import vlplan.planner` imports torch: **{summary['imports_torch']}**.", "",
                 "| command (`vlplan estimate ... --json`, fresh process) | median | max |", "|---|---:|---:|"]
        lines += [f"| `{r['args']}` | {r['median_s']:.3f} s | {r['max_s']:.3f} s |" for r in results]
        lines.append(END)
        doc = ROOT / "docs" / "speed.md"
        text = doc.read_text()
        doc.write_text(text[:text.index(BEGIN)] + "\n".join(lines) + text[text.index(END) + len(END):])


if __name__ == "__main__":
    main()
