"""`vlplan scan DATA.json`: tokens per sample of a LLaMA-Factory dataset, over-long samples, bad images, worst case."""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path

import typer

from vlplan import estimate
from vlplan.planner.errors import VlplanError

from .options import errors, llamafactory_files, setup_command
from .render import console, gib, print_json, table

PROGRESS_MIN_SAMPLES = 5000  # smaller datasets scan in well under a second
# Pillow refuses to open an image of more than twice Image.MAX_IMAGE_PIXELS (int(1024 * 1024 * 1024 // 4 // 3) by
# default; PIL/Image.py _decompression_bomb_check raises DecompressionBombError), and so do LLaMA-Factory and vlplan run
PILLOW_MAX_PIXELS = 2 * (1024 * 1024 * 1024 // 4 // 3)
SHOW_INDICES = 20


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


@contextlib.contextmanager
def _progress(kwargs):
    """A rich progress bar on stderr for large datasets, only for humans (not --json, stderr a terminal)."""
    if kwargs.get("json_") or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("scanning"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True), transient=True)
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if total < PROGRESS_MIN_SAMPLES:
            return
        if task is None:
            bar.start()
            task = bar.add_task("scan", total=total)
        bar.update(task, completed=done)

    try:
        yield update
    finally:
        bar.stop()


def _needs_data(fn):
    """DATA may come from --from-llamafactory's `dataset` (with its dataset_dir, as LLaMA-Factory looks it up);
    without either there is nothing to scan."""
    @functools.wraps(fn)
    def wrapper(**kwargs):
        if kwargs.get("data") is None:
            with errors():
                raise VlplanError("no dataset to scan: pass DATA (a dataset file, folder or dataset_info name), or "
                                  "--from-llamafactory with a dataset: key")
        return fn(**kwargs)

    return wrapper


@llamafactory_files("data", run_options=False)
@_needs_data
@setup_command(dataset_argument="data", progress=_progress)
def scan_command(setup, resolved,
                 data: Path = typer.Argument(None, help="LLaMA-Factory dataset file (JSON or JSONL), a folder of "
                                                        "them, or a dataset name in --dataset-info (default: the "
                                                        "--from-llamafactory YAML's dataset, in its dataset_dir)."),
                 json_: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Scan a dataset: vision, text and total tokens per sample (p50/p90/p99/max), samples over --cutoff-len,
    missing and corrupt images, placeholder mismatches, and the estimate for its longest sample.

    Image sizes come from the file headers (no decoding); vision tokens follow --model's image processor after
    LLaMA-Factory's pre-resize to --image-max-pixels; text tokens use the model's tokenizer when --model (or
    --tokenizer) is a local folder with one, else an approximation the output names. The method, precision and
    parallelism flags (or --from-llamafactory) decide the worst-case estimate.
    """
    scan = resolved.scan
    with errors():
        result = estimate(setup)
    data_dict = scan.to_dict()
    too_large = [i for i, sizes in enumerate(scan.image_sizes) if any(w * h > PILLOW_MAX_PIXELS for w, h in sizes)]
    if too_large:
        shown = ", ".join(map(str, too_large[:SHOW_INDICES])) + (" ..." if len(too_large) > SHOW_INDICES else "")
        resolved.warnings.append(f"{_plural(len(too_large), 'sample')} with an image over Pillow's decompression-bomb "
                                 f"limit ({PILLOW_MAX_PIXELS:,} pixels), which neither LLaMA-Factory nor vlplan run "
                                 f"can open: {shown}")
        if not json_:
            typer.echo(f"warning: {resolved.warnings[-1]}", err=True)
    if json_:
        print_json({**data_dict, "worst_case": {"sample": resolved.sample, "percentile": resolved.percentile,
                                                "estimate": result.to_dict()},
                    "warnings": resolved.warnings, "sources": resolved.sources})
        return
    console.print(f"[bold]{scan.path}[/bold]: {scan.samples} samples, {data_dict['images']} images, "
                  f"{scan.videos} videos; {scan.model}, image_max_pixels {scan.image_max_pixels}, "
                  f"cutoff_len {scan.cutoff_len}")
    console.print(f"text tokens: {scan.text_tokens_method}")
    rows = [[name, *(data_dict[key][q] for q in ("p50", "p90", "p99", "max"))]
            for name, key in (("vision", "vision_tokens"), ("text", "text_tokens"), ("total", "total_tokens"))]
    console.print(table("tokens per sample", ["tokens", "p50", "p90", "p99", "max"], rows, {1, 2, 3, 4}))
    over = scan.over_cutoff
    if over:
        shown = ", ".join(str(i) for i in over[:SHOW_INDICES]) + (" ..." if len(over) > SHOW_INDICES else "")
        console.print(f"[red]{_plural(len(over), 'sample')} over cutoff_len {scan.cutoff_len}[/red] (LLaMA-Factory "
                      f"would cut their image tokens and crash): {shown}")
    else:
        console.print(f"[green]every sample fits cutoff_len {scan.cutoff_len}[/green]")
    for label, names in (("missing image", scan.missing_images), ("corrupt image", list(scan.corrupt_images)),
                         ("missing video", scan.missing_videos), ("unreadable video", list(scan.corrupt_videos))):
        if names:
            shown = ", ".join(names[:SHOW_INDICES]) + (" ..." if len(names) > SHOW_INDICES else "")
            console.print(f"[red]{_plural(len(names), label)}[/red]: {shown}")
    if scan.placeholder_mismatches:
        console.print(f"[red]{_plural(len(scan.placeholder_mismatches), 'sample')}[/red] whose <image>/<video> "
                      "placeholders do not match their media: "
                      f"{', '.join(map(str, scan.placeholder_mismatches[:SHOW_INDICES]))}")
    verdict = "[green]fits[/green]" if result.fits else "[red]does not fit[/red]"
    console.print(f"worst case (sample #{resolved.sample}, {setup.seq_len} tokens, images "
                  f"{', '.join(f'{w}x{h}' for w, h in setup.images) or 'none'}"
                  f"{'; videos ' + ', '.join(v.label() for v in setup.videos) if setup.videos else ''}): peak {gib(result.peak_bytes)} on "
                  f"{setup.gpu.name} ({setup.method}, {setup.precision}, batch {setup.batch_size}): {verdict}")
