"""`vlplan profile`: the real-step pipeline (build, prepare, steps, per-phase records, comparison, JSON, plot, OOM)
on the CPU test/dev backend with tiny models, calibration on synthetic records, the one-line refusals, and GPU tests
that run where CUDA is (skipped elsewhere)."""

import json
import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

import torch  # noqa: E402
from tiny import tiny_spec  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from vlplan.cli.main import app  # noqa: E402
from vlplan.planner.hf_config import spec_to_hf_config  # noqa: E402
from vlplan.planner.memory import overheads  # noqa: E402
from vlplan.planner.setup import make_setup  # noqa: E402
from vlplan.profiler.calibrate import calibrate, compare  # noqa: E402
from vlplan.profiler.profile import PHASES, STEP_TERM, TRAINING_PHASES, ProfileOptions, profile  # noqa: E402

runner = CliRunner()
CUDA = torch.cuda.is_available()
MIB = 2**20
PERSISTENT = ("weights/", "adapters/", "optimizer/", "inputs/")
TINY = dict(method="lora", seq_len=256, image_size=(224, 224))


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code=2):
    assert result.exit_code == code, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in result.output, result.output
    return err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A local config.json of the tiny Qwen2-VL: what `--model DIR` resolves for CLI runs."""
    path = tmp_path_factory.mktemp("tiny-qwen2-vl")
    (path / "config.json").write_text(json.dumps(spec_to_hf_config(tiny_spec("qwen2-vl-2b"))))
    return path


@pytest.fixture(scope="module")
def lora_run():
    return profile(make_setup(tiny_spec("qwen2-vl-2b"), **TINY), ProfileOptions(backend="cpu", steps=2))


# The pipeline on the CPU backend ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_every_phase_is_measured_and_agrees_with_the_estimate(lora_run):
    r = lora_run
    assert set(r.phases) == set(PHASES) and r.oom is None
    rows = {row["phase"]: row for row in r.phase_rows()}
    for phase in TRAINING_PHASES:
        # the CPU backend counts live tensors as the tracer does; the estimate models the same step symbolically
        assert abs(rows[phase]["error"]) < 0.005, rows[phase]
    assert r.peak_phase == r.estimate.peak_phase
    assert r.phases["load"].allocated_peak_bytes > 0 and rows["load"]["estimate_allocated_bytes"] is None
    # per step, the phases in order; the load first
    assert [(x.phase, x.step) for x in r.records] == [("load", 0)] + [
        (phase, step) for step in (1, 2) for phase in TRAINING_PHASES]
    assert all(b.start_s >= a.end_s - 1e-9 for a, b in zip(r.records, r.records[1:]))
    assert len(r.step_times_s) == 2 and all(t > 0 for t in r.step_times_s) and r.step_time_s == r.step_times_s[1]


@pytest.mark.slow
def test_terms_are_measured_two_ways_and_match_the_estimate(lora_run):
    r = lora_run
    terms = {row["term"]: row for row in r.term_rows()}
    persistent = {k: v for k, v in r.estimate.breakdown_bytes.items() if k.startswith(PERSISTENT)}
    assert persistent and {k: terms[k]["measured_bytes"] for k in persistent} == persistent
    # the tracker's own categories at the measured peak agree with the storages added up by term
    at_peak = r.phases[r.peak_phase].breakdown_bytes
    assert {k: at_peak[k] for k in persistent} == {k: r.terms_bytes[k] for k in persistent}
    assert abs(terms[STEP_TERM]["error"]) < 0.01
    assert r.terms_bytes["gradients/language"] == r.terms_bytes["adapters/language"]  # fp32 LoRA gradients
    assert not any(t.startswith("cuda/") for t in terms)  # the CPU backend measures no device overheads


@pytest.mark.slow
def test_timeline_json_and_record(lora_run, tmp_path):
    r = lora_run
    times = [p[0] for p in r.timeline]
    assert len(r.timeline) > 50 and times == sorted(times)
    assert 0.99 * r.allocated_peak_bytes <= max(p[1] for p in r.timeline) <= r.allocated_peak_bytes
    data = json.loads(json.dumps(r.to_dict()))
    assert data["measured"]["peak_phase"] == r.peak_phase and data["profile"]["backend"] == "cpu"
    assert data["measured"]["device_peak_bytes"] is None and data["measured"]["reserved_peak_bytes"] is None
    record = r.to_record()
    for key in ("config", "device", "torch", "transformers", "estimate_peak_bytes", "measured_peak_bytes",
                "estimate_allocated_peak_bytes", "measured_allocated_peak_bytes", "oom", "step_time_s"):
        assert key in record
    assert record["config"] == r.setup.describe() and record["torch"] == torch.__version__
    assert record["measured_allocated_peak_bytes"] == r.allocated_peak_bytes and record["oom"] is False

    from vlplan.profiler.plot import plot_timeline

    png = plot_timeline(r, tmp_path / "timeline.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_full_training_with_accumulation_on_another_family():
    setup = make_setup(tiny_spec("llava-1.5-7b"), method="full", train_vision=True, train_projector=True,
                       seq_len=128, gradient_checkpointing=False, gradient_accumulation_steps=2, attn="eager")
    r = profile(setup, ProfileOptions(backend="cpu", steps=2))
    rows = {row["phase"]: row for row in r.phase_rows()}
    for phase in TRAINING_PHASES:
        assert abs(rows[phase]["error"]) < 0.01, rows[phase]
    # two micro-batches per step: two forwards and backwards before each optimizer step
    assert [x.phase for x in r.records if x.step == 2].count("forward") == 2
    assert r.terms_bytes["optimizer/adam_states"] == r.estimate.breakdown_bytes.get(
        "optimizer/adam_states", r.terms_bytes["optimizer/adam_states"])


@pytest.mark.slow
def test_memory_limit_runs_out_of_memory_reports_and_frees(lora_run):
    """A limit between the loss and backward peaks: a real torch.OutOfMemoryError in the first backward."""
    loss, backward = (lora_run.phases[p].allocated_peak_bytes for p in ("loss", "backward"))
    limit = (loss + backward) // 2
    r = profile(make_setup(tiny_spec("qwen2-vl-2b"), **TINY),
                ProfileOptions(backend="cpu", steps=2, memory_limit_bytes=limit))
    assert r.oom is not None
    assert (r.oom["phase"], r.oom["step"]) == ("backward", 1)
    assert r.oom["estimate_peak_bytes"] == r.estimate.peak_bytes and r.oom["suspect_term"]
    assert r.oom["live_bytes"] > limit >= r.oom["live_bytes"] - r.oom["requested_bytes"]
    assert r.oom["allocated_after_free_bytes"] < 64 * 1024  # model, optimizer, batch and activations freed
    loaded = sum(v for k, v in r.terms_bytes.items() if k.startswith(("weights/", "adapters/", "inputs/")))
    assert loaded <= r.oom["measured_start_bytes"] <= loaded + 64 * 1024  # what was live before the first step
    assert r.records[-1].phase == "backward" and r.to_record()["oom"] is True
    assert r.term_rows() == []  # the steps did not complete: no per-term comparison


# The CLI ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_profile_writes_json_and_plot(tiny_dir, tmp_path):
    out, png = tmp_path / "profile.json", tmp_path / "timeline.png"
    result = run("profile", "--model", tiny_dir, "--backend", "cpu", "--seq-len", 256, "--image-size", "224x224",
                 "--precision", "fp32", "--steps", 2, "--output", out, "--plot", png, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data == json.loads(out.read_text())
    assert set(data["measured"]["phases"]) == set(PHASES)
    assert {row["phase"] for row in data["comparison"]["phases"]} == set(PHASES)
    assert "warnings" in data and "sources" in data
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "step 2/2" in result.stderr


@pytest.mark.slow
def test_cli_out_of_memory_exits_3_with_one_line(tiny_dir, tmp_path):
    result = run("profile", "--model", tiny_dir, "--backend", "cpu", "--seq-len", 256, "--image-size", "224x224",
                 "--steps", 1, "--memory-limit-gib", 0.004, "--output", tmp_path / "p.json")
    assert result.exit_code == 3, result.output
    err = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "out of memory (cpu) in the" in err[0] and "estimated peak" in err[0]
    assert "Traceback" not in result.output
    assert json.loads((tmp_path / "p.json").read_text())["oom"]["phase"] in PHASES


@pytest.mark.skipif(CUDA, reason="checks the message of a machine without CUDA")
def test_without_cuda_one_line_and_nonzero():
    err = one_line_error(run("profile", "--model", "qwen2-vl-2b"))
    assert "needs a CUDA GPU" in err and "--backend cpu" in err


BAD = [
    (["--steps", "0"], "--steps must be between 1 and 100"),
    (["--backend", "tpu"], "--backend 'tpu' is not one of cuda, cpu"),
    (["--backend", "cpu", "--snapshot", "x.pickle"], "--snapshot .* needs --backend cuda"),
    (["--backend", "cpu", "--method", "qlora"], "cannot run bitsandbytes"),
    (["--backend", "cpu", "--zero", "2", "--num-gpus", "2"], "one training process"),
    (["--backend", "cpu", "--memory-limit-gib", "-1"], "--memory-limit-gib must be positive"),
    (["--sweep", "s.yaml", "--calibrate"], "separate runs"),
    (["results.json"], "results files go with --calibrate"),
    (["--backend", "cpu", "--weights", "/nonexistent/dir"], "no config.json there"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line(args, message, tmp_path):
    import re

    base = [] if args[0] in ("--sweep", "results.json") else ["--model", "qwen2-vl-2b"]
    err = one_line_error(run("profile", *base, *args, "--output", tmp_path / "p.json"))
    assert re.search(message, err), err


def test_sweep_and_calibrate_refuse_setup_flags():
    err = one_line_error(run("profile", "--sweep", "s.yaml", "--model", "qwen2-vl-2b"))
    assert "--model does not apply to --sweep" in err
    err = one_line_error(run("profile", "--calibrate", "r.json", "--seq-len", "4096"))
    assert "--seq-len does not apply to --calibrate" in err
    assert "does not exist" in one_line_error(run("profile", "--calibrate", "/nonexistent/r.json"))


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="checks the message of a machine without CUDA")
def test_plan_confirm_without_cuda_prints_the_plan_then_one_line():
    args = ["plan", "--model", "qwen2-vl-2b", "-g", "8"]
    plain = run(*args)
    assert plain.exit_code == 0 and plain.stderr == ""
    confirmed = run(*args, "--confirm")
    assert confirmed.exit_code == 1
    assert confirmed.stdout == plain.stdout  # the plan as without --confirm
    err = confirmed.stderr.strip()
    assert "\n" not in err and err.startswith("error: confirmation needs a CUDA GPU")
    data = json.loads(run(*args, "--confirm", "--json").stdout)
    assert data["micro_batch_size"] == json.loads(run(*args, "--json").stdout)["micro_batch_size"]
    assert "CUDA GPU" in data["confirmation"]["error"]


# Calibration --------------------------------------------------------------------------------------------------------
def record(device="NVIDIA H100 80GB HBM3", *, estimate=20 * 2**30, measured=21 * 2**30, context=500 * MIB,
           workspace=64 * MIB, reserved=10 * 2**30, allocated=9 * 2**30, transient=4 * 2**30, rss=3 * 2**30,
           oom=False, error=None, backend="cuda", world_size=1, nccl=None, capacity=80 * 2**30):
    breakdown = {"weights/language": 5 * 2**30, "activations/language": transient // 2,
                 "temporaries/language": transient - transient // 2, "cuda/context": overheads.CUDA_CONTEXT_BYTES}
    return {
        "config": {"model": "qwen2.5-vl-7b", "method": "lora", "vision": "frozen", "seq_len": 2048,
                   "batch_size": 1, "images": ["768x768"], "gradient_checkpointing": True, "world_size": world_size},
        "device": device, "backend": backend, "torch": "2.11.0", "transformers": "5.17.0",
        "versions": {"cuda": "13.0"}, "date": "2026-12-01T10:00:00Z",
        "estimate_peak_bytes": estimate, "measured_peak_bytes": None if oom else measured,
        "estimate_allocated_peak_bytes": estimate - 2 * 2**30,
        "measured_allocated_peak_bytes": None if oom else allocated + workspace,
        "oom": oom, "error": error, "step_time_s": 1.0, "capacity_bytes": capacity,
        "measured_peak_phase": "backward",
        "measured_phases": {"backward": {"allocated_peak_bytes": allocated, "reserved_peak_bytes": reserved}},
        "estimate_breakdown_bytes": breakdown, "host_rss_peak_bytes": rss,
        "overheads": {"non_allocator_bytes": context, "cublas_workspace_bytes": workspace,
                      **({"nccl_buffers_bytes": nccl} if nccl else {})},
    }


def constants(records):
    return {c.name: c for c in calibrate(records).constants}


def test_calibration_derives_each_constant_from_its_measurement():
    records = [record(context=500 * MIB + 1, reserved=10 * 2**30, allocated=9 * 2**30),  # reserve 1 GiB of 4
               record(context=450 * MIB, workspace=40 * MIB, reserved=9 * 2**30, allocated=8.5 * 2**30),
               record("NVIDIA A100-SXM4-80GB", workspace=17 * MIB, rss=5 * 2**30 + 1),
               record(world_size=2, nccl=900 * MIB + 5),
               record(context=10 * 2**30, error="crashed"), record(context=10 * 2**30, oom=True),
               record(context=10 * 2**30, backend="cpu")]
    c = constants(records)
    assert c["CUDA_CONTEXT_BYTES"].derived == 501 * MIB  # the largest, rounded up to a MiB; bad records ignored
    assert c["CUDA_CONTEXT_BYTES"].current == overheads.CUDA_CONTEXT_BYTES and len(c["CUDA_CONTEXT_BYTES"].values) == 4
    assert c["CUBLAS_WORKSPACE_HOPPER_BYTES"].derived == 64 * MIB / overheads.CUBLAS_WORKSPACES
    assert c["CUBLAS_WORKSPACE_OTHER_BYTES"].derived == 17 * MIB / overheads.CUBLAS_WORKSPACES
    assert "ALLOCATOR_FRAGMENTATION" not in c  # the reserve is replayed, not a constant: compared per term instead
    assert c["NCCL_BYTES"].derived == 901 * MIB
    assert c["PROCESS_HOST_BYTES"].derived == 5 * 2**30 + 64 * MIB
    calibration = calibrate(records)
    assert calibration.used == 4 and calibration.records == 7
    assert calibration.devices == ["NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"]
    assert calibration.dates == ["2026-12-01"]


def test_calibration_without_records_derives_nothing():
    c = constants([record(backend="cpu")])
    assert all(v.derived is None and not v.values for v in c.values())
    assert "not measured" in c["NCCL_BYTES"].note


def test_comparison_table_numbers():
    gib = 2**30
    records = [record(estimate=10 * gib, measured=8 * gib),  # +25%
               record(estimate=9 * gib, measured=10 * gib),  # -10%: under
               record(estimate=11 * gib, measured=10 * gib),  # +10%
               record(estimate=70 * gib, oom=True),  # OOM where the estimate said it fits: under
               record(estimate=90 * gib, oom=True),  # OOM the estimate foresaw
               record(error="killed")]  # left out
    table = compare(records)
    assert [round(e, 6) for e in table.errors] == [0.25, -0.1, 0.1]
    assert table.median_abs_error == pytest.approx(0.1) and table.worst_error == pytest.approx(0.25)
    assert table.under_predictions == 2 and len(table.rows) == 5
    md = table.to_markdown()
    assert "median |error| **10.0%**, worst **+25.0%**, under-predictions **2**" in md
    assert md.count("\n| qwen2.5-vl-7b") == 5 and "| out of memory |" in md and "| -10.0% |" in md
    allocated = compare(records, "allocated")  # less the measured cuBLAS workspace
    assert allocated.rows[0].measured_bytes == 9 * gib and allocated.rows[0].estimate_bytes == 8 * gib


def test_cli_calibrate_prints_constants_and_markdown(tmp_path):
    path = tmp_path / "gpu-h100-2026-12-01.json"
    path.write_text(json.dumps([record(), record(estimate=19 * 2**30)]))
    result = run("profile", "--calibrate", path)
    assert result.exit_code == 0, result.output
    assert "CUDA_CONTEXT_BYTES" in result.stdout and "NVIDIA H100 80GB HBM3" in result.stdout
    assert "torch 2.11.0" in result.stdout and "2026-12-01" in result.stdout
    data = json.loads(run("profile", "--calibrate", path, path, "--json").stdout)
    assert data["calibration"]["records"] == 4
    assert data["comparison"]["peak"]["under_predictions"] == 4  # both records, read twice, are under
    md = run("profile", "--calibrate", path, "--markdown").stdout
    assert md.count("| configuration | device | estimate | measured | error |") == 2


# On a GPU -----------------------------------------------------------------------------------------------------------
gpu = pytest.mark.gpu  # skipped without a CUDA GPU (tests/conftest.py)


@gpu
def test_cuda_profile_matches_the_estimate(tmp_path):
    from vlplan.planner.registry import resolve

    setup = make_setup(resolve("qwen2-vl-2b"), method="lora", seq_len=1024, image_size=(448, 448))
    snapshot = tmp_path / "snapshot.pickle"
    r = profile(setup, ProfileOptions(backend="cuda", steps=3, snapshot=str(snapshot)))
    assert r.oom is None and set(r.phases) == set(PHASES)
    for row in r.phase_rows():
        if row["phase"] in TRAINING_PHASES:
            assert abs(row["error"]) < 0.05, row  # live tensors: within 5% of the estimate
            assert row["reserved_peak_bytes"] >= row["measured_allocated_bytes"]
    assert abs((r.estimate.peak_bytes - r.device_peak_bytes) / r.device_peak_bytes) < 0.15
    o = r.overheads
    assert 100 * MIB < o["context_init_bytes"] <= o["non_allocator_bytes"] < 3 * 2**30
    assert 0 < o["cublas_workspace_bytes"] <= 256 * MIB
    assert all(p[2] is not None and p[3] is not None for p in r.timeline)
    assert snapshot.is_file() and snapshot.stat().st_size > 0
    assert r.step_time_s > 0 and not math.isnan(r.step_time_s)


@gpu
def test_cuda_out_of_memory_is_caught_and_freed(tiny_dir, tmp_path):
    from vlplan.planner.registry import resolve

    setup = make_setup(resolve("qwen2-vl-2b"), method="lora", seq_len=1024, image_size=(448, 448))
    r = profile(setup, ProfileOptions(backend="cuda", steps=2, memory_limit_bytes=2 * 2**30))
    assert r.oom is not None and r.oom["phase"] in PHASES
    assert r.oom["allocated_after_free_bytes"] < 512 * MIB
    result = run("profile", "--model", "qwen2-vl-2b", "--seq-len", 1024, "--image-size", "448x448",
                 "--memory-limit-gib", 2, "--output", tmp_path / "p.json")
    assert result.exit_code == 3 and "out of memory (cuda)" in result.stderr
