"""The tracer: faithful to a real (non-fake) CPU training step, and its layer extrapolation equals a full trace."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from tiny import tiny_spec  # noqa: E402

from vlplan.planner.setup import make_setup  # noqa: E402
from vlplan.profiler.trace import run_trace, trace  # noqa: E402

CASES = [
    ("qwen2-vl-2b", dict(method="lora", seq_len=512, image_size=(224, 224))),
    ("qwen2.5-vl-3b", dict(method="full", train_vision=True, train_projector=True, seq_len=512,
                           image_size=(224, 224), gradient_checkpointing=False)),
    ("llava-1.5-7b", dict(method="lora", train_vision=True, seq_len=256, attn="eager")),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_fake_trace_equals_real_cpu_step(name, kw):
    """The same tracker on real tensors (a real CPU training step of a tiny model) and on fake tensors agree."""
    setup = make_setup(tiny_spec(name), **kw)
    fake = run_trace(setup, fake=True)
    real = run_trace(setup, fake=False)
    for phase, snap in real.phase_peaks.items():
        assert fake.phase_peaks[phase].total_bytes == pytest.approx(snap.total_bytes, rel=0.01), phase
    assert fake.peak.phase == real.peak.phase


@pytest.mark.slow
@pytest.mark.parametrize("name,kw", [
    ("qwen2.5-vl-3b", dict(method="lora", seq_len=512, image_size=(448, 448))),
    ("qwen2-vl-2b", dict(method="full", seq_len=512, image_size=(224, 224), gradient_checkpointing=False)),
    ("llava-1.5-7b", dict(method="lora", train_vision=True, train_projector=True, seq_len=256)),
], ids=["qwen2.5-vl-lora", "qwen2-vl-full-nogc", "llava-vision-lora"])
def test_extrapolated_trace_equals_full_trace(name, kw):
    setup = make_setup(tiny_spec(name, text_layers=5, vision_layers=5), **kw)
    extrapolated = trace(setup, layers=2)
    full = trace(setup, full=True)
    assert extrapolated.extrapolated and not full.extrapolated
    assert extrapolated.phase_allocated_bytes == full.phase_allocated_bytes
    assert extrapolated.peak_phase == full.peak_phase
    assert extrapolated.breakdown_bytes == full.breakdown_bytes


def test_trace_refuses_what_it_cannot_run():
    from vlplan.planner.errors import VlplanError

    setup = make_setup(tiny_spec("qwen2-vl-2b"), method="lora", num_gpus=2, zero=2, seq_len=512,
                       image_size=(224, 224))
    with pytest.raises(VlplanError, match="ZeRO"):
        run_trace(setup)
    setup = make_setup(tiny_spec("qwen2-vl-2b"), method="qlora", seq_len=512, image_size=(224, 224))
    with pytest.raises(VlplanError, match="bitsandbytes"):
        run_trace(setup)


def test_transformers_outside_the_modeled_releases_is_named_in_one_line(monkeypatch):
    """Checked from the installed distribution's metadata (no transformers import): every setup command warns in one
    line, in its JSON too; nothing is said on the modeled releases or without transformers."""
    import json

    from typer.testing import CliRunner

    from vlplan.cli.main import app
    from vlplan.planner import versions

    import transformers

    assert versions.installed_transformers() == transformers.__version__  # read without importing it
    assert versions.transformers_warning("5.23.0") is None and versions.transformers_warning("5.0.1") is None
    for version in ("5.24.0", "5.25.0", "4.57.1", "6.0.0.dev0"):
        warning = versions.transformers_warning(version)
        assert warning and "\n" not in warning and "transformers<5.24" in warning and version in warning
    monkeypatch.setattr(versions, "installed_transformers", lambda: "5.25.0")
    result = CliRunner().invoke(app, ["estimate", "--model", "qwen2-vl-2b", "--json"])
    assert result.exit_code == 0
    assert any("transformers 5.25.0 is installed" in w for w in json.loads(result.stdout)["warnings"])
    assert result.stderr.count("warning: transformers 5.25.0") == 1
    monkeypatch.setattr(versions, "installed_transformers", lambda: None)
    result = CliRunner().invoke(app, ["estimate", "--model", "qwen2-vl-2b", "--json"])
    assert json.loads(result.stdout)["warnings"] == [] and "warning" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "phi-3.5-vision"], "has no class for the phi3_v family"),
    (["--model", "minicpm-v-2.6"], "has no class for the minicpmv family"),
    (["--model", "qwen2-vl-2b", "--layers", "-1"], "--layers must be 1 or more"),
])
def test_trace_refuses_in_one_line(args, message):
    from typer.testing import CliRunner

    from vlplan.cli.main import app

    result = CliRunner().invoke(app, ["trace", *args])
    assert result.exit_code == 2 and "Traceback" not in result.output
    *warnings, err = result.stderr.strip().splitlines()  # an unverified registry spec is warned about first
    assert all(line.startswith("warning: ") for line in warnings)
    assert err.startswith("error: ") and message in err


@pytest.mark.slow
def test_trace_device_terms_are_the_estimates():
    """What the tracer cannot see (context, cuBLAS workspaces, the caching allocator's reserve) is the estimate's own
    term for the same setup, the replay included (no factor of its own): trace and estimate differ by live tensors."""
    from vlplan.planner.memory.estimate import estimate

    setup = make_setup(tiny_spec("qwen2-vl-2b"), method="lora", seq_len=512, image_size=(224, 224))
    traced = trace(setup)
    expected = estimate(setup)
    device = {k: v for k, v in expected.breakdown_bytes.items() if k.startswith("cuda/")}
    assert device["cuda/allocator_reserve"] > 0
    assert {k: v for k, v in traced.breakdown_bytes.items() if k.startswith("cuda/")} == device
    assert traced.peak_bytes - traced.allocated_peak_bytes == expected.peak_bytes - expected.allocated_peak_bytes
