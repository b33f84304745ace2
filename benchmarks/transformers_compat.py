"""The estimate against `vlplan trace` on full-size models under the installed transformers, per phase: how far a
transformers release outside the modeled range (>=5.0,<5.24) moves real setups. From 5.24 the multimodal model
outputs keep the vision encoder's outputs alive until the loss is computed; the tiny test models show it as up to 3%
in the loss phase, which these full-size setups put in proportion.

    python benchmarks/transformers_compat.py            # prints the table
    python benchmarks/transformers_compat.py --write    # also updates its section of docs/accuracy.md

Run it in an environment with the transformers release to compare (e.g. a venv with transformers==5.25.0 and
`pip install --no-deps -e .`); each trace is a fresh `vlplan trace` process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- transformers_compat:begin -->", "<!-- transformers_compat:end -->"
PHASES = ("forward", "loss", "backward", "optimizer")
CONFIGS = [
    ["--model", "qwen2.5-vl-7b", "--method", "lora"],
    ["--model", "qwen2.5-vl-7b", "--method", "lora", "--no-gradient-checkpointing"],
    ["--model", "llava-1.5-7b", "--method", "lora"],
    ["--model", "qwen3-vl-8b", "--method", "lora", "--images", "2"],
    ["--model", "internvl3-8b", "--method", "full"],
    ["--model", "idefics3-8b", "--method", "lora", "--seq-len", "4096"],
]


def vlplan(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "vlplan.cli.main", *args, "--json"], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    import transformers

    rows = []
    for config in CONFIGS:
        est, trace = vlplan("estimate", *config), vlplan("trace", *config)
        phases = {p: (est["phase_allocated_bytes"][p], trace["phase_allocated_bytes"][p]) for p in PHASES}
        rows.append({"config": " ".join(config), "estimate": est["allocated_peak_bytes"],
                     "trace": trace["allocated_peak_bytes"], "peak_phase": (est["peak_phase"], trace["peak_phase"]),
                     "phase_error": {p: (a - b) / b for p, (a, b) in phases.items()}})
        print(json.dumps(rows[-1]), flush=True)
    if not args.write:
        return
    lines = [BEGIN, f"Measured {time.strftime('%Y-%m-%d')} with transformers {transformers.__version__} "
             "(`python benchmarks/transformers_compat.py --write` in an environment with that release): the "
             "estimate's live-tensor peak against the trace, and per phase (estimate - trace) / trace.", "",
             "| setup | estimate | trace | peak error | peak phase | " + " | ".join(PHASES) + " |",
             "|---|---:|---:|---:|---|" + "---:|" * len(PHASES)]
    for r in rows:
        errors = " | ".join(f"{100 * r['phase_error'][p]:+.2f}%" for p in PHASES)
        lines.append(f"| `{r['config']}` | {r['estimate'] / 2**30:.3f} GiB | {r['trace'] / 2**30:.3f} GiB | "
                     f"{100 * (r['estimate'] - r['trace']) / r['trace']:+.3f}% | {r['peak_phase'][0]} / "
                     f"{r['peak_phase'][1]} | {errors} |")
    lines.append(END)
    doc = ROOT / "docs" / "accuracy.md"
    text = doc.read_text()
    block = "\n".join(lines)
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## transformers releases after the modeled ones\n\n" + block + "\n"
    doc.write_text(text)


if __name__ == "__main__":
    main()
