"""`vlplan plan --confirm` end to end on the cpu backend: the chosen micro-batch and the next one up profiled in
their own processes and held against the plan's budget."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from tiny import tiny_spec  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from vlplan.cli.main import app  # noqa: E402
from vlplan.planner.hf_config import spec_to_hf_config  # noqa: E402

runner = CliRunner()


@pytest.mark.slow
def test_plan_confirm_measures_the_chosen_and_the_next_micro_batch(tmp_path):
    """A GPU of 732 MiB: with a 10% margin micro-batch 2 fits (estimate 685.77 MB of a 690.8 MB budget, the reserve
    from the caching-allocator replay) and 4 does not (694.16 MB), on the estimate and on the measurement."""
    (tmp_path / "config.json").write_text(json.dumps(spec_to_hf_config(tiny_spec("qwen2-vl-2b"))))
    args = ["plan", "--model", str(tmp_path), "--seq-len", "128", "--image-size", "224x224", "--precision", "fp32",
            "-g", "4", "--gpu-memory-gib", "0.71484375"]
    result = runner.invoke(app, [*args, "--confirm", "--confirm-backend", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    confirmation = data["confirmation"]
    assert data["micro_batch_size"] == 2 and confirmation["confirmed"] is True
    chosen, bigger = confirmation["runs"]
    assert (chosen["micro_batch_size"], bigger["micro_batch_size"]) == (2, 4)
    assert chosen["within_budget"] is True and chosen["measured_bytes"] <= chosen["budget_bytes"]
    assert chosen["measured_allocated_peak_bytes"] > 0 and chosen["step_time_s"] > 0
    assert confirmation["next_breaks_margin"] is True and bigger["within_budget"] is False
    assert bigger["oom"] or bigger["measured_bytes"] > bigger["budget_bytes"]
    assert chosen["budget_bytes"] == data["budget_bytes"]
    # without --confirm the plan is the same
    plain = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert {k: v for k, v in data.items() if k != "confirmation"} == plain


@pytest.mark.slow
def test_plan_confirm_of_a_deepspeed_or_multi_gpu_plan_points_to_vlplan_run(tmp_path):
    result = runner.invoke(app, ["plan", "--model", "qwen2.5-vl-7b", "--num-gpus", "4", "-g", "16", "--confirm",
                                 "--confirm-backend", "cpu"])
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the plan uses 4 GPU(s)") and "vlplan run --plan" in line
