"""`python -m vlplan.runner.worker`: one rank that `vlplan run`'s launcher (torchrun / deepspeed / accelerate) starts
per GPU. It trains the job handed to it in `VLPLAN_JOB` (runner/job.py), writes its progress lines to stderr, as
`vlplan run` does in its own process, and exits with the code the launcher reads: 0 done, 2 bad input, 3 out of
memory, 128 + signal when interrupted."""

from __future__ import annotations

import json
import os
import shlex
import sys

from vlplan.planner.errors import VlplanError

from .job import JOB_ENV


def event_line(kind: str, data: dict) -> str:
    """One progress line of a run's event (`on_event(kind, data)` of `runner.launch.run` and `runner.train.train`)."""
    if kind == "step":
        parts = [f"step {data['step']}/{data['max_steps']}", f"loss {data['loss']:.4f}"]
        if "learning_rate" in data:
            parts.append(f"lr {data['learning_rate']:.2e}")
        return "  ".join(parts)
    if kind == "dataset":
        dropped = ", ".join(f"{n} {why}" for why, n in data["dropped"].items())
        return (f"dataset: {data['kept']} of {data['samples']} samples (longest {data['longest_tokens']} tokens)"
                + (f"; dropped {dropped}" if dropped else ""))
    if kind == "checkpoint":
        return f"saved {data['path']}"
    if kind == "launch":
        return (f"launching {data['processes_per_node']} x {data['nodes']} processes: "
                f"{shlex.join(data['command'])} (the job in {JOB_ENV})")
    if kind == "retry":
        return f"{data['message']}\nretrying: {data['change']}"
    if kind == "interrupted":
        return (f"interrupted by {data['signal']} at step {data['step']}; checkpoint {data['checkpoint']}; continue "
                "with --resume")
    return data.get("message", json.dumps(data))


def print_event(kind: str, data: dict) -> None:
    print(event_line(kind, data), file=sys.stderr, flush=True)


def main() -> int:
    """Train the job of `VLPLAN_JOB` in this rank; a bad job is one line on stderr and exit code 2."""
    if JOB_ENV not in os.environ:
        print(f"error: {JOB_ENV} is not set: this module is one rank of a `vlplan run` launch, which hands it the job "
              "(run `vlplan run` instead)", file=sys.stderr)
        return 2
    from .launch import worker_main

    try:
        return worker_main(on_event=print_event)
    except VlplanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
