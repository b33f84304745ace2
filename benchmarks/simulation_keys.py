"""How many of a table's simulations a simulator symbolic in the micro-batch (and the sequence length) could share.

    python benchmarks/simulation_keys.py qwen2.5-vl-3b,qwen2.5-vl-7b,qwen2.5-vl-32b,qwen2.5-vl-72b

Runs `compute_rows` for the models over the tables_speed matrix (4 methods x every GPU type x sequences 2048, 8192 x
images 448x448, 768x768, 1920x1080) with the persistent cache off, counting the extrapolated simulations
(`step._simulate_extrapolated`), the simulator passes (`step.simulate`), and the distinct simulation keys left when
the micro-batch (and the sequence length) is taken out of the key: what docs/speed.md weighs a symbolic pass against.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["VLPLAN_NO_CACHE"] = "1"

from vlplan.planner.hardware import CATALOG  # noqa: E402
from vlplan.planner.memory import step  # noqa: E402
from vlplan.tables.compute import compute_rows  # noqa: E402

SIZE_FIELDS = ("batch_size", "gradient_accumulation_steps")


def main() -> None:
    models = sys.argv[1].split(",")
    keys, passes = [], [0]
    extrapolated, simulate = step._simulate_extrapolated, step.simulate

    def counted_extrapolated(setup):
        keys.append(step.simulation_key(setup))
        return extrapolated(setup)

    def counted_simulate(*args, **kwargs):
        passes[0] += 1
        return simulate(*args, **kwargs)

    step._simulate_extrapolated, step.simulate = counted_extrapolated, counted_simulate
    rows = compute_rows(models, ["full", "freeze", "lora", "qlora"], list(CATALOG), [2048, 8192],
                        [(448, 448), (768, 768), (1920, 1080)])

    def without(names):
        return {tuple(item for item in key if item[0] not in names) for key in keys}

    print(json.dumps({"rows": len(rows), "extrapolated_simulations": len(keys), "simulator_passes": passes[0],
                      "at_micro_batch_above_1": sum(1 for key in keys if dict(key)["batch_size"] > 1),
                      "distinct_without_micro_batch": len(without(SIZE_FIELDS)),
                      "distinct_without_micro_batch_and_sequence": len(without(SIZE_FIELDS + ("seq_len",)))}))


if __name__ == "__main__":
    main()
