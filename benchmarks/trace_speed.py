"""Wall time of `vlplan trace` for a 7B VLM: qwen2.5-vl-7b LoRA, seq 2048, one 896x896 image (the issue's target:
< 30 s on 2 cores), in a fresh process.

    python benchmarks/trace_speed.py [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model", "qwen2.5-vl-7b", "--method", "lora", "--seq-len", "2048", "--image-size", "896x896",
        "--image-max-pixels", str(896 * 896)]
BEGIN, END = "<!-- trace_speed:begin -->", "<!-- trace_speed:end -->"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    times, result = [], None
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "vlplan.cli.main", "trace", *ARGS, "--json"], check=True,
                             capture_output=True, text=True).stdout
        times.append(time.perf_counter() - start)
        result = json.loads(out)
    summary = {"command": "vlplan trace " + " ".join(ARGS), "seconds": times, "cpus": os.cpu_count(),
               "vision_tokens": result["tokens"]["vision_tokens_per_sample"],
               "allocated_peak_bytes": result["allocated_peak_bytes"], "layers_traced": result["layers_traced"]}
    print(json.dumps(summary, indent=2))
    if args.write:
        lines = [BEGIN, f"Measured {time.strftime('%Y-%m-%d')} on {summary['cpus']} CPUs: `{summary['command']}` "
                 f"({summary['vision_tokens']} vision tokens) took {min(times):.1f}-{max(times):.1f} s wall "
                 f"(fresh process, imports included) over {len(times)} runs; traced layer counts "
                 f"{summary['layers_traced']}.", END]
        doc = ROOT / "docs" / "speed.md"
        text = doc.read_text()
        doc.write_text(text[:text.index(BEGIN)] + "\n".join(lines) + text[text.index(END) + len(END):])


if __name__ == "__main__":
    main()
