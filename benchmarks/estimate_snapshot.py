"""Every estimate and plan over the registry and a grid of settings, as JSON: the guard of a refactor that must leave
every number byte-identical.

    python benchmarks/estimate_snapshot.py /tmp/before.json            # record
    python benchmarks/estimate_snapshot.py /tmp/after.json --compare /tmp/before.json

The grid covers each method (full, freeze, LoRA, DoRA, QLoRA 4/8-bit), component training, ZeRO 0-3 with offload,
checkpointing on and off, sdpa and eager, pure bf16 and fp16 GPUs, Adafactor, both stacks, 0-4 images and several
sizes, with `vlplan plan` for a few GPU counts. A setting a model refuses is recorded with its one-line error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GRID = [
    dict(method="lora"),
    dict(method="lora", lora_dropout=0.05, gradient_checkpointing=False, seq_len=1024, image_size=["448x448"]),
    dict(method="lora", dora=True, image_size=["1024x768"], seq_len=4096),
    dict(method="lora", train_vision=True, train_projector=True, images=2, image_size=["896x896"], seq_len=8192),
    dict(method="qlora", quant_bits=4, image_size=["1344x1008"], seq_len=4096),
    dict(method="qlora", quant_bits=8, gpu="t4", precision="fp16", image_size=["448x448"]),
    dict(method="full", image_size=["448x448"], zero=2, num_gpus=4),
    dict(method="full", train_vision=True, zero=3, offload="optimizer", num_gpus=8, seq_len=4096),
    dict(method="full", precision="pure-bf16", optimizer="adafactor", attn="eager", seq_len=1024),
    dict(method="freeze", images=0, seq_len=512, batch_size=4),
    dict(method="lora", stack="llamafactory", images=4, image_size=["640x480"], seq_len=8192),
    dict(method="full", zero=3, offload="all", num_gpus=2, stack="llamafactory", gpu="a100-40g"),
]
PLANS = [dict(method="lora", num_gpus=1), dict(method="full", num_gpus=8)]


def snapshot() -> dict:
    from vlplan.planner.errors import VlplanError
    from vlplan.planner.memory.estimate import estimate
    from vlplan.planner.plan import plan
    from vlplan.planner.registry import names
    from vlplan.planner.resolve import resolve_setup

    out: dict = {}
    for model in names():
        for i, settings in enumerate(GRID):
            key = f"{model} estimate {i} {json.dumps(settings, sort_keys=True)}"
            try:
                resolved = resolve_setup(model=model, **settings)
                result = estimate(resolved.setup).to_dict()
                result["warnings"] = resolved.warnings
                out[key] = result
            except VlplanError as error:
                out[key] = {"error": str(error)}
        for i, settings in enumerate(PLANS):
            key = f"{model} plan {i} {json.dumps(settings, sort_keys=True)}"
            try:
                setup = resolve_setup(model=model, **settings).setup
                out[key] = plan(setup, global_batch_size=16).to_dict()
            except VlplanError as error:
                out[key] = {"error": str(error)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--compare", type=Path, help="a snapshot recorded before; exit 1 on any difference")
    args = parser.parse_args()
    data = snapshot()
    args.out.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    print(f"{len(data)} results -> {args.out}")
    if args.compare:
        before = json.loads(args.compare.read_text())
        after = json.loads(args.out.read_text())
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        for key in changed[:20]:
            print(f"differs: {key}")
        print(f"{len(changed)} of {len(before)} differ")
        return 1 if changed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
