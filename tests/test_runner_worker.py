"""`python -m vlplan.runner.worker`, the module a launch starts once per rank (the torchrun test in test_runner.py
trains through it): started by hand, or handed a job that is not one, it says so in one line with exit code 2."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from vlplan.runner.launch import WORKER_MODULE  # noqa: E402


def _worker(env_job: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VLPLAN_JOB"}
    if env_job is not None:
        env["VLPLAN_JOB"] = env_job
    return subprocess.run([sys.executable, "-m", WORKER_MODULE], env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_launched_module_is_the_runners():
    assert WORKER_MODULE == "vlplan.runner.worker"


@pytest.mark.parametrize("job, message", [
    (None, "error: VLPLAN_JOB is not set: this module is one rank of a `vlplan run` launch"),
    ("{not json", "error: VLPLAN_JOB does not hold a vlplan job"),
])
def test_a_worker_without_a_job_is_one_line(job, message):
    done = _worker(job)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), done.stderr
