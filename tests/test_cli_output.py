"""Human output in an 80-column terminal and in a pipe: nothing a user types is cut, usage errors are one line,
no raw Python containers, one name per memory term across `trace` and `estimate`, and `--version`."""

from __future__ import annotations

import re
from importlib.metadata import version

import pytest
import typer
from typer.testing import CliRunner

from vlplan.cli.main import app
from vlplan.planner.registry import all_specs

runner = CliRunner()
ELLIPSIS = "\u2026"


def run(*args, columns: int | None = None):
    env = {"COLUMNS": str(columns)} if columns else {"COLUMNS": None}  # None: unset, as in a pipe
    return runner.invoke(app, list(args), env=env)


def test_models_keeps_every_name_whole_at_80_columns():
    result = run("models", columns=80)
    assert result.exit_code == 0, result.output
    assert ELLIPSIS not in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    words = set(re.findall(r"[\w.\-/]+", result.stdout))
    for spec in all_specs():
        assert spec.name in words, f"{spec.name} is cut or folded in:\n{result.stdout}"
    # the hub ids (second column) may fold over lines at 80 columns, but every character is there
    hub_ids: dict[str, str] = {}
    name = ""
    for line in result.stdout.splitlines():
        cells = [cell.strip() for cell in line.split("\u2502")[1:-1]]
        if len(cells) < 2:
            continue
        name = cells[0] or name
        hub_ids[name] = hub_ids.get(name, "") + cells[1]
    assert hub_ids == {spec.name: spec.hf_id for spec in all_specs()}


def test_models_in_a_pipe_is_one_line_per_model():
    result = run("models")
    assert result.exit_code == 0, result.output
    for spec in all_specs():
        assert any(spec.name in line and spec.hf_id in line for line in result.stdout.splitlines()), spec.name


def _options(command) -> list[str]:
    return [opt for param in command.params for opt in (*param.opts, *param.secondary_opts) if opt.startswith("-")]


@pytest.mark.parametrize("name", sorted(typer.main.get_command(app).commands))
def test_help_keeps_every_option_name_at_80_columns(name):
    command = typer.main.get_command(app).commands[name]
    result = run(name, "--help", columns=80)
    assert result.exit_code == 0, result.output
    assert ELLIPSIS not in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    words = set(re.findall(r"--?[\w\-]+", result.stdout))
    missing = [opt for opt in _options(command) if opt not in words]
    assert not missing, f"{name} --help cuts {missing}"


USAGE_ERRORS = [
    (["estimate", "--model", "qwen2-vl-2b", "--seq-len", "1.5"], "Invalid value for '--seq-len'"),
    (["estimate", "--model", "qwen2-vl-2b", "--mfu", "0.4"], "No such option: --mfu"),
    (["tokens", "--image", "448x448"], "Missing option '--model'"),
    (["tiny-model"], "Missing argument"),
    (["no-such-command"], "No such command"),
    (["estimate", "--model"], "requires an argument"),
]


@pytest.mark.parametrize("args,message", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_are_one_line(args, message):
    result = run(*args, columns=80)
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert message in err and "--help" in err


def test_version():
    result = run("--version")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"vlplan {version('vlplan')}"


def test_trace_output_names_layer_counts_in_words(monkeypatch):
    """The human trace summary spells the traced layer counts out (it printed a list of dicts)."""
    pytest.importorskip("torch")
    import vlplan.profiler.trace as trace_module

    class Result:
        breakdown_bytes = {"weights/language": 2**30, "temporaries/loss": 2**28}
        by_category = {"weights": 2**30, "temporaries": 2**28}
        peak_phase, allocated_peak_bytes, peak_bytes, seconds, extrapolated = "backward", 2**30, 2**31, 1.5, True
        layers_traced = [{"text": 2, "vision": 2}, {"text": 3, "vision": 2}, {"text": 2, "vision": 3}]
        emulated: list = []
        host_offloaded_bytes = 0

    monkeypatch.setattr(trace_module, "trace", lambda setup, **_: Result())
    result = run("trace", "--model", "qwen2-vl-2b", columns=80)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "traced 2 text + 2 vision layers; 3 text + 2 vision layers; 2 text + 3 vision layers" in text
    assert "{" not in result.stdout and "[" not in result.stdout


def test_trace_names_the_loss_backward_as_the_estimator_does():
    """Backward temporaries outside any module take their segment's scope: the loss's backward is
    temporaries/loss in both trace and estimate (the tracer called it temporaries/backward)."""
    pytest.importorskip("torch")
    from vlplan.profiler.memtrack import BACKWARD_SCOPES, MemoryTracker

    tracker = MemoryTracker()
    tracker.phase = "backward"
    expected = {"loss": "temporaries/loss", "language": "temporaries/language", "encoder": "temporaries/vision"}
    for segment, category in expected.items():
        tracker.subphase = segment
        assert tracker.default_category() == category
    assert set(BACKWARD_SCOPES) == set(expected)
    tracker.subphase = ""  # no segment marked: the phase, as before
    assert tracker.default_category() == "temporaries/backward"
    tracker.module_stack.append("model.language_model.layers.0")  # checkpoint recomputation runs module hooks
    tracker.scope_of = lambda module: "language"
    assert tracker.default_category() == "temporaries/language"


@pytest.mark.slow
def test_trace_and_estimate_share_term_names():
    pytest.importorskip("transformers")
    import json

    args = ["--model", "qwen2-vl-2b", "--seq-len", "256", "--image-size", "112x112", "--json"]
    traced = run("trace", *args, "--layers", "1")
    estimated = run("estimate", *args)
    assert traced.exit_code == 0 and estimated.exit_code == 0, traced.output + estimated.output
    trace_terms = set(json.loads(traced.stdout)["breakdown_bytes"])
    estimate_terms = set(json.loads(estimated.stdout)["breakdown_bytes"])
    assert "temporaries/backward" not in trace_terms
    assert {t for t in trace_terms if t.startswith("temporaries/")} <= {
        "temporaries/loss", "temporaries/language", "temporaries/vision", "temporaries/projector",
        "temporaries/optimizer"} and "temporaries/loss" in estimate_terms


def test_estimate_states_the_stack_it_assumes(tmp_path):
    """The README's first line names the stack; a LLaMA-Factory YAML implies LLaMA-Factory's."""
    from typer.testing import CliRunner

    from vlplan.cli.main import app

    result = CliRunner().invoke(app, ["estimate", "--model", "qwen2.5-vl-7b", "--method", "lora"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].endswith("checkpointing on, vlplan stack")
    config = tmp_path / "train.yaml"
    config.write_text("model_name_or_path: qwen2.5-vl-7b\nfinetuning_type: lora\nbf16: true\n")
    result = CliRunner().invoke(app, ["estimate", "--from-llamafactory", str(config)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].endswith("llamafactory stack")
