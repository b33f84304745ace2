"""`vlplan profile`: real training steps measured per phase against the estimate; sweeps; calibration."""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path

import typer
from rich.console import Console

from vlplan.planner.errors import VlplanError
from vlplan.planner.io.files import check_output_file, writing

from .options import SETUP_OPTIONS, errors, resolve_setup
from .render import GIB, console, gib, gib_or_dash, percent, print_json, table

stderr_console = Console(stderr=True)


def deferred_setup(fn):
    """Attach the shared setup flags to `fn` like `setup_command`, but resolve them only when asked: `fn` receives
    `setup_options` (the flags as given) and `resolve()` (the ResolvedSetup, warnings echoed), so --sweep and
    --calibrate run without a --model."""
    signature = inspect.signature(fn)
    own = [p for p in signature.parameters.values() if p.name not in ("setup_options", "resolve")]

    @functools.wraps(fn)
    def wrapper(**kwargs):
        options = {p.name: kwargs.pop(p.name) for p in SETUP_OPTIONS}

        def resolve():
            with errors():
                resolved = resolve_setup(**options)
            for warning in resolved.warnings:
                typer.echo(f"warning: {warning}", err=True)
            return resolved

        return fn(setup_options=options, resolve=resolve, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=own + SETUP_OPTIONS)
    return wrapper


@deferred_setup
def profile_command(
    setup_options: dict,
    resolve,
    files: list[Path] = typer.Argument(None, help="With --calibrate: results files (benchmarks/results/gpu-*.json).",
                                       show_default=False),
    steps: int = typer.Option(3, "--steps", help="Training steps to run (peaks are taken over steps 2..N)."),
    backend: str = typer.Option("cuda", "--backend", help="cuda (a GPU) | cpu (a test/dev backend: the same steps "
                                                          "on CPU tensors, live tensors counted as the tracer does)."),
    weights: Path = typer.Option(None, "--weights", help="Load real weights from this model directory (default: "
                                                         "random weights from the config, nothing downloaded)."),
    memory_limit_gib: float = typer.Option(None, "--memory-limit-gib",
                                           help="Cap the memory: cuda caps the caching allocator "
                                                "(set_per_process_memory_fraction) to emulate a smaller GPU; cpu "
                                                "raises torch.OutOfMemoryError when live tensors exceed it."),
    output: Path = typer.Option(None, "--output", "-o",
                                help="JSON file (default vlplan_profile.json; with --sweep: benchmarks/results/"
                                     "gpu-<device>-<date>.json, appended)."),
    plot: Path = typer.Option(None, "--plot", help="Write the memory timeline with the estimate's phases (PNG)."),
    snapshot: Path = typer.Option(None, "--snapshot", help="Save a torch.cuda memory snapshot (pickle) for "
                                                           "https://pytorch.org/memory_viz."),
    sweep: Path = typer.Option(None, "--sweep", help="Run the configurations of a sweep YAML, each in a fresh "
                                                     "process, and append their records to --output."),
    timeout_s: float = typer.Option(600.0, "--timeout-s", help="With --sweep: seconds per configuration before it "
                                                               "is killed and recorded as an error."),
    rerun: bool = typer.Option(False, "--rerun", help="With --sweep: run configurations already in the results "
                                                      "file again."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Derive the estimator's overhead constants and the "
                                                              "accuracy table from the results FILES."),
    markdown: bool = typer.Option(False, "--markdown", help="With --calibrate: print the comparison tables as "
                                                            "Markdown for docs/accuracy.md."),
    json_: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Measure real training steps on a GPU, per phase, against the estimate.

    Builds the model on the device with random weights (or --weights), prepares it as `vlplan run` does, runs
    --steps steps on synthetic batches with the setup's image tokens and measures model load, forward, loss,
    backward and optimizer step: torch.cuda max allocated and reserved, NVML device memory, the CUDA context and
    step time. Exit codes: 0 measured, 2 bad input or no CUDA GPU, 3 out of memory (reported with the phase and
    the estimate), 1 a sweep with failed configurations.
    """
    modes = [name for name, on in (("--sweep", sweep is not None), ("--calibrate", calibrate)) if on]
    with errors():
        if len(modes) > 1:
            raise VlplanError("--sweep and --calibrate are separate runs; pass one of them")
        if files and not calibrate:
            raise VlplanError(f"unexpected argument {files[0]}: results files go with --calibrate")
        if modes:
            given = [p.name for p in SETUP_OPTIONS if setup_options[p.name] is not None]
            if given:
                flag = "--" + given[0].replace("_", "-")
                raise VlplanError(f"{flag} does not apply to {modes[0]}: "
                                  + ("put it in the sweep file (its defaults: or a configuration)" if sweep else
                                     "calibration reads the settings from the records"))
    if calibrate:
        return _calibrate(files or [], markdown, json_)
    if sweep is not None:
        return _sweep(sweep, backend, output, timeout_s, rerun, json_)
    resolved = resolve()
    return _profile(resolved, steps, backend, weights, memory_limit_gib, output, plot, snapshot, json_)


# One profile --------------------------------------------------------------------------------------------------------
def _profile(resolved, steps, backend, weights, memory_limit_gib, output, plot, snapshot, json_):
    with errors():
        try:
            from vlplan import profile
            from vlplan.planner.oom import OOM_EXIT_CODE
            from vlplan.profiler.profile import ProfileOptions, make_backend
        except ImportError as err:
            raise VlplanError(f"profile needs torch and transformers ({err.name} is missing): pip install "
                              "'vlplan[gpu]'") from None
        options = ProfileOptions(steps=steps, backend=backend, weights=str(weights) if weights else None,
                                 memory_limit_bytes=int(memory_limit_gib * GIB) if memory_limit_gib else None,
                                 snapshot=str(snapshot) if snapshot else None)
        if plot is not None:
            _check_matplotlib()
        output = output or Path("vlplan_profile.json")
        # refused before the steps run, not after
        for path, flag in ((output, "--output"), (plot, "--plot"), (snapshot, "--snapshot")):
            if path is not None:
                check_output_file(path, flag)
        backend_ = make_backend(options)
        result = profile(resolved.setup, options, backend=backend_, on_event=_progress_event)
        data = {**result.to_dict(), **resolved.json_extras()}
        with writing([output], "--output"):
            _write_json(output, data)
        if plot is not None:
            from vlplan.profiler.plot import plot_timeline

            with writing([plot], "--plot"):
                plot_timeline(result, plot)
    if json_:
        print_json(data)
    else:
        render_profile(result)
        written = [str(output)] + ([str(plot)] if plot else []) + ([str(snapshot)] if snapshot else [])
        console.print(f"wrote {', '.join(written)}")
    if result.oom is not None:
        typer.echo(f"error: {result.oom['message']}", err=True)
        raise typer.Exit(OOM_EXIT_CODE)


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise VlplanError("--plot needs matplotlib: pip install 'vlplan[plot]'") from None


def _write_json(path: Path, data) -> None:
    from vlplan.planner.io.files import write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)


def _progress_event(kind: str, data: dict) -> None:
    if kind == "step":
        print(f"step {data['step']}/{data['steps']}: {data['seconds']:.2f} s", file=sys.stderr, flush=True)
    elif kind == "phase":
        print(f"{data['phase']}...", file=sys.stderr, flush=True)


def render_profile(result) -> None:
    s, e = result.setup, result.estimate
    device = result.device
    console.print(f"[bold]{s.model.name}[/bold] {s.method}; seq {s.seq_len} x batch {s.batch_size}, "
                  f"{len(s.images)} image(s) ({s.vision_tokens_per_sample} vision tokens); checkpointing "
                  f"{'on' if s.gradient_checkpointing else 'off'}; on {device.get('name')} ({result.options.backend}"
                  f" backend), {result.options.steps} step(s); torch {result.versions['torch']}, transformers "
                  f"{result.versions['transformers']}")
    rows = [[r["phase"], gib_or_dash(r["measured_allocated_bytes"]), gib_or_dash(r["estimate_allocated_bytes"]),
             percent(r["error"]), gib_or_dash(r["reserved_peak_bytes"]), gib_or_dash(r["device_used_peak_bytes"]),
             f"{r['seconds']:.3f} s"] for r in result.phase_rows()]
    console.print(table("per phase (peaks; steps 2..N)", ["phase", "allocated", "estimate (live tensors)",
                                                          "error", "reserved", "device used (NVML)", "time"],
                        rows, {1, 2, 3, 4, 5, 6}))
    if result.oom is None:
        rows = [[r["term"], gib_or_dash(r["estimate_bytes"]), gib_or_dash(r["measured_bytes"]), percent(r["error"])]
                for r in result.term_rows()]
        console.print(table("per term", ["term", "estimate", "measured", "error"], rows, {1, 2, 3}))
    o = result.overheads
    if o.get("context_init_bytes") is not None or o.get("non_allocator_bytes") is not None:
        console.print(f"CUDA context {gib_or_dash(o.get('context_init_bytes'))} at start, "
                      f"{gib_or_dash(o.get('non_allocator_bytes'))} beyond the allocator after the steps; cuBLAS "
                      f"workspaces {gib_or_dash(o.get('cublas_workspace_bytes'))}")
    parts = []
    if result.device_peak_bytes is not None:
        from vlplan.profiler.profile import relative_error

        parts.append(f"device peak {gib(result.device_peak_bytes)} (estimate {gib(e.peak_bytes)}, "
                     f"{percent(relative_error(e.peak_bytes, result.device_peak_bytes))})")
    if result.allocated_peak_bytes is not None:
        parts.append(f"live-tensor peak {gib(result.allocated_peak_bytes)} in {result.peak_phase} (estimate "
                     f"{gib(e.allocated_peak_bytes)} in {e.peak_phase})")
    if result.step_time_s is not None:
        parts.append(f"step time {result.step_time_s:.3f} s")
    if parts:
        console.print("; ".join(parts))
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)


# Sweeps -------------------------------------------------------------------------------------------------------------
def _sweep(path: Path, backend: str, output: Path | None, timeout_s: float, rerun: bool, json_: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with errors():
        from vlplan.profiler.sweep import load_sweep, run_sweep

        configs = load_sweep(path, backend=backend, timeout_s=timeout_s)
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=stderr_console)
        state = {}

        def on_event(kind, data):
            if kind == "start":
                note = f" ({data['skipped']} already in {data['path']})" if data["skipped"] else ""
                stderr_console.print(f"sweep: {data['total']} configuration(s) to run{note}; results -> "
                                        f"{data['path']}")
                state["task"] = progress.add_task("starting", total=data["total"])
            elif kind == "config":
                progress.update(state["task"], description=f"#{data['index'] + 1} {data['label']}")
            elif kind == "record":
                progress.advance(state["task"])
                progress.console.print(_record_line(data))

        with progress:
            summary = run_sweep(configs, backend=backend, output=output, rerun=rerun, on_event=on_event)
    if json_:
        print_json(summary.to_dict())
    else:
        console.print(f"{summary.ran} run, {summary.skipped} skipped, {summary.ooms} out of memory, "
                      f"{summary.errors} failed; records appended to {summary.path}")
    if summary.errors:
        raise typer.Exit(1)


def _record_line(record: dict) -> str:
    from vlplan.profiler.sweep import config_label_of

    label = config_label_of(record)
    if record.get("error"):
        return f"[red]failed[/red] {label}: {record['error']}"
    if record.get("oom"):
        return f"[yellow]out of memory[/yellow] {label} (estimate {gib_or_dash(record.get('estimate_peak_bytes'))})"
    measured = record.get("measured_peak_bytes")
    estimate = record.get("estimate_peak_bytes")
    if measured is None:
        measured, estimate = record.get("measured_allocated_peak_bytes"), record.get("estimate_allocated_peak_bytes")
    error = (estimate - measured) / measured if measured else None
    return f"[green]measured[/green] {label}: {gib_or_dash(measured)} vs estimate {gib_or_dash(estimate)} ({percent(error)})"


# Calibration --------------------------------------------------------------------------------------------------------
def _calibrate(files: list[Path], markdown: bool, json_: bool):
    with errors():
        from vlplan.profiler.calibrate import calibrate, compare, read_record_files

        records = read_record_files(files)
        calibration = calibrate(records)
        comparisons = {measure: compare(records, measure) for measure in ("peak", "allocated")}
    if json_:
        print_json({"calibration": calibration.to_dict(),
                    "comparison": {k: c.to_dict() for k, c in comparisons.items()}})
        return
    if markdown:
        for comparison in comparisons.values():
            sys.stdout.write(comparison.to_markdown() + "\n")
        return
    console.print(f"{calibration.used} of {calibration.records} records usable (cuda, no error, no OOM); devices: "
                  f"{', '.join(calibration.devices) or '-'}; dates: {', '.join(calibration.dates) or '-'}; versions: "
                  + ("; ".join(", ".join(f"{k} {v}" for k, v in version.items()) for version in calibration.versions)
                     or "-"))
    rows = []
    for c in calibration.constants:
        fmt = (lambda v: f"{v / 2**20:.1f} MiB") if c.unit == "bytes" else (lambda v: f"{v:.3f}")
        rows.append([c.name, fmt(c.current), fmt(c.derived) if c.derived is not None else "not measured",
                     len(c.values), fmt(c.median) if c.values else "-", fmt(c.largest) if c.values else "-"])
    console.print(table("overhead constants (planner/memory/overheads.py)",
                        ["constant", "current", "derived", "records", "median", "max"], rows, {1, 2, 3, 4, 5}))
    for c in calibration.constants:
        console.print(f"- {c.name}: {c.rule}" + (f" ({c.note})" if c.note else ""))
    for measure, comparison in comparisons.items():
        median, worst = comparison.median_abs_error, comparison.worst_error
        console.print(f"{measure}: {len(comparison.errors)} compared, median |error| "
                      f"{percent(median).lstrip('+')}, worst {percent(worst)}, {comparison.under_predictions} "
                      "under-prediction(s)")
