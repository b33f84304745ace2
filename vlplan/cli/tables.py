"""`vlplan tables`: hardware sizing tables (peak per GPU, largest micro-batch, fewest GPUs) for many setups."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import typer

from vlplan.planner.errors import VlplanError
from vlplan.planner.hardware import gpu_names
from vlplan.planner.io.files import check_output_dir, writing
from vlplan.planner.registry import names as model_names
from vlplan.planner.tokens import parse_size
from vlplan.tables.compute import METHODS, Conditions
from vlplan.tables.formats import FORMATS, render
from vlplan.tables.generate import check_table, write_table
from vlplan.tables.presets import PRESETS, preset
from vlplan.tables.spec import COMMON_GPUS, Table, TableSpec

from .options import errors
from .render import print_json

PROGRESS_MIN_ROWS = 200  # smaller tables take a few seconds
USER_STEM = "tables"  # --out DIR writes DIR/tables.<format> (and DIR/tables_<plot>.png)
CONDITIONS_PANEL = "Conditions (every row)"
DEFAULT_CONDITIONS = Conditions()


def default_workers() -> int:
    return min(4, max(2, os.cpu_count() or 1))


def _names(text: str, flag: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise VlplanError(f"{flag} is empty; give a comma-separated list")
    return values


def _ints(text: str, flag: str) -> list[int]:
    values = []
    for value in _names(text, flag):
        try:
            number = int(value)
        except ValueError:
            raise VlplanError(f"{flag}: {value!r} is not a whole number of tokens (e.g. {flag} 2048,8192)") from None
        if number <= 0:
            raise VlplanError(f"{flag}: {number} is not a positive number of tokens")
        values.append(number)
    return values


def _sizes(text: str) -> list[tuple[int, int] | None]:
    sizes = []
    for value in _names(text, "--image-sizes"):
        if value.lower() == "none":
            sizes.append(None)
            continue
        try:
            sizes.append(parse_size(value))
        except VlplanError as err:
            raise VlplanError(f"--image-sizes: {err}") from None
    return sizes


def _formats(text: str, several: bool) -> tuple[str, ...]:
    formats = tuple(_names(text, "--format"))
    for fmt in formats:
        if fmt not in FORMATS:
            raise VlplanError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if len(formats) > 1 and not several:
        raise VlplanError("several --format values need --out DIR (stdout takes one format)")
    return formats


@contextlib.contextmanager
def _progress(total: int, enabled: bool):
    """A rich progress bar on stderr for big tables, only on a terminal."""
    if not enabled or total < PROGRESS_MIN_ROWS or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("rows"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("rows", total=total)
        yield lambda rows: bar.advance(task, rows)


def tables_command(
    models: str | None = typer.Option(None, "--models", help="Comma-separated registry names, hub ids or local "
                                      "configs (see `vlplan models`), or all."),
    methods: str | None = typer.Option(None, "--methods", help=f"Comma-separated {', '.join(METHODS)}, or all "
                                       "(default: all)."),
    gpus: str | None = typer.Option(None, "--gpus", help="Comma-separated GPU ids (see `vlplan gpus`), or all "
                                    f"(default: {','.join(COMMON_GPUS)})."),
    seq_lens: str | None = typer.Option(None, "--seq-lens", help="Comma-separated tokens per sample, image tokens "
                                        "included (default: 2048)."),
    image_sizes: str | None = typer.Option(None, "--image-sizes", help="Comma-separated WxH, or none for rows "
                                           "without images (default: the square at --image-max-pixels, 768x768)."),
    images: int | None = typer.Option(None, "--images", rich_help_panel=CONDITIONS_PANEL,
                                      help=f"Images per sample, all of the row's size (default: "
                                           f"{DEFAULT_CONDITIONS.images})."),
    image_max_pixels: int | None = typer.Option(None, "--image-max-pixels", rich_help_panel=CONDITIONS_PANEL,
                                                help="LLaMA-Factory pre-resize cap (image_max_pixels) (default: "
                                                     f"{DEFAULT_CONDITIONS.image_max_pixels})."),
    margin: float | None = typer.Option(None, "--margin", rich_help_panel=CONDITIONS_PANEL,
                                        help="A setup fits when its peak is at most (1 - margin) of the GPU's memory "
                                             f"(default: {DEFAULT_CONDITIONS.margin})."),
    attn: str | None = typer.Option(None, "--attn", rich_help_panel=CONDITIONS_PANEL,
                                    help=f"sdpa | fa2 | eager (default: {DEFAULT_CONDITIONS.attn})."),
    lora_rank: int | None = typer.Option(None, "--lora-rank", rich_help_panel=CONDITIONS_PANEL,
                                         help=f"LoRA rank (default: {DEFAULT_CONDITIONS.lora_rank})."),
    quant_bits: int | None = typer.Option(None, "--quant-bits", rich_help_panel=CONDITIONS_PANEL,
                                          help="QLoRA weight bits, 4 or 8 (default: "
                                               f"{DEFAULT_CONDITIONS.quant_bits})."),
    gradient_checkpointing: bool | None = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                       rich_help_panel=CONDITIONS_PANEL,
                                                       help="Activation checkpointing (default: on)."),
    format_: str | None = typer.Option(None, "--format", help=f"{' | '.join(FORMATS)} (default: md); with --out, a "
                                       "comma-separated list writes one file per format."),
    json_: bool = typer.Option(False, "--json", help="Print the table as JSON (--format json); with --out or "
                               "--check, report the files written or stale as JSON."),
    out: Path | None = typer.Option(None, "--out", help=f"Write the files into this folder ({USER_STEM}.<format>, "
                                    f"{USER_STEM}_<plot>.png; a preset names its own) instead of printing. Files of "
                                    "the same name are replaced only if vlplan tables wrote them."),
    plot: bool = typer.Option(False, "--plot", help="Also draw PNG plots into --out (needs matplotlib, the `plot` "
                              "extra): heatmaps of the largest micro-batch and fewest GPUs, peak vs image pixels and "
                              "vs sequence length, the breakdown per method."),
    preset_name: str | None = typer.Option(None, "--preset", help=f"A named table: {', '.join(PRESETS)} (the "
                                           "committed tables/generated/ files)."),
    check: bool = typer.Option(False, "--check", help="Compare the files in --out (default: the committed "
                               "tables/generated/) with what the code computes now; exit 1 naming the stale ones."),
    workers: int | None = typer.Option(None, "--workers", help="Processes computing rows (default: the CPU count, "
                                       "2 to 4)."),
):
    """Sizing tables: per model, method, sequence length and image size, the per-GPU peak at micro-batch 1, the
    largest micro-batch one GPU of each type holds and the fewest GPUs of each type that fit (with the ZeRO stage or
    offload it takes). Every number is `vlplan estimate` of the setup the row states.

    Examples: `vlplan tables --models qwen2.5-vl-7b,llava-1.5-7b --seq-lens 2048,8192 --image-sizes 448x448,1920x1080`;
    `vlplan tables --preset committed --out tables/generated` (regenerates the committed tables);
    `vlplan tables --check`.
    """
    with errors():
        selection = {"models": models, "methods": methods, "gpus": gpus, "seq_lens": seq_lens,
                     "image_sizes": image_sizes}
        conditions = {"images": images, "image_max_pixels": image_max_pixels, "margin": margin, "attn": attn,
                      "lora_rank": lora_rank, "quant_bits": quant_bits,
                      "gradient_checkpointing": gradient_checkpointing}
        workers = default_workers() if workers is None else workers
        if workers < 1:
            raise VlplanError(f"--workers must be 1 or more, got {workers}")
        most = max(os.cpu_count() or 1, default_workers())
        if workers > most:  # each worker is a process with its own copy of the planner: more only add memory
            raise VlplanError(f"--workers {workers} is above this machine's {os.cpu_count()} CPUs; use at most {most}")
        job = _job(selection, conditions, format_, json_, out, plot, preset_name, check)
        if job.directory is not None and not check:
            check_output_dir(job.directory, "--out")  # before the rows are computed
        to_stdout_json = job.directory is None and job.formats == ("json",)
        with _progress(job.table.row_count, enabled=not json_ and not to_stdout_json) as progress:
            rows = job.table.rows(workers=workers, progress=progress)
        if check:
            stale = check_table(job.directory, job.table, rows, job.formats, job.plot)
        elif job.directory is not None:
            with writing([job.directory], "--out"):
                written = write_table(job.directory, job.table, rows, job.formats, job.plot)
    if check:
        _report_check(job.directory, stale, job.regenerate, len(rows), json_)
    elif job.directory is not None:
        if json_:
            print_json({"written": [str(p) for p in written], "rows": len(rows)})
        else:
            for path in written:
                typer.echo(f"wrote {path}")
    else:
        sys.stdout.write(render(job.formats[0], job.table, rows))


@dataclass(frozen=True)
class _Job:
    table: Table
    formats: tuple[str, ...]
    plot: bool
    directory: Path | None  # None: print the one format to stdout
    regenerate: str  # the command that rewrites `directory`'s files (named by --check)


def _job(selection: dict, conditions: dict, format_: str | None, json_: bool, out: Path | None, plot: bool,
         preset_name: str | None, check: bool) -> _Job:
    """What the flags ask for: the table, its formats and plots, and where they go (or are checked)."""
    if json_ and format_ not in (None, "json") and out is None and not check:
        raise VlplanError(f"--json is --format json; drop --format {format_}")
    if check and preset_name is None and all(v is None for v in selection.values()):
        preset_name = "committed"  # `vlplan tables --check`: the committed tables
    formats = None
    if preset_name is not None:
        given = [f"--{k.replace('_', '-')}" for k, v in {**selection, **conditions}.items() if v is not None]
        if given:
            raise VlplanError(f"--preset {preset_name} fixes the table; drop {', '.join(given)}")
        chosen = preset(preset_name)
        table = chosen.table
        directory = out if out is not None else (chosen.directory if check else None)
        if directory is not None and format_ is None:
            formats, plot = chosen.formats, plot or chosen.plot
        regenerate = chosen.regenerate if out is None else f"vlplan tables --preset {preset_name} --out {out}"
    else:
        table = _user_table(selection, conditions)
        directory = out
    if formats is None:
        formats = ("json",) if json_ and directory is None else _formats(format_ or "md", several=directory is not None)
    if preset_name is None:
        regenerate = f"{table.command} --format {','.join(formats)}{' --plot' if plot else ''} --out {out}" \
            if out is not None else ""
    if plot and directory is None:
        raise VlplanError("--plot writes PNG files: add --out DIR")
    if check and directory is None:
        raise VlplanError("--check compares the files of a folder: add --out DIR")
    if plot and not check:
        from vlplan.tables.plots import require_matplotlib

        require_matplotlib()
    return _Job(table, formats, plot, directory, regenerate)


def _user_table(selection: dict, condition_flags: dict) -> Table:
    """The table of the selection flags (the defaults where absent) under the condition flags given."""
    if selection["models"] is None:
        raise VlplanError("pass --models NAME,NAME (see `vlplan models`, or all), or --preset committed")
    conditions = Conditions(**{k: v for k, v in condition_flags.items() if v is not None})
    models = model_names() if selection["models"].strip().lower() == "all" else _names(selection["models"],
                                                                                      "--models")
    methods = METHODS if (selection["methods"] or "all").strip().lower() == "all" else _names(selection["methods"],
                                                                                            "--methods")
    gpus = gpu_names() if (selection["gpus"] or "").strip().lower() == "all" else \
        _names(selection["gpus"], "--gpus") if selection["gpus"] is not None else COMMON_GPUS
    seq_lens = _ints(selection["seq_lens"], "--seq-lens") if selection["seq_lens"] is not None else [2048]
    if selection["image_sizes"] is not None:
        sizes = _sizes(selection["image_sizes"])
    elif conditions.images == 0:
        sizes = [None]
    else:
        side = int(conditions.image_max_pixels ** 0.5)
        sizes = [(side, side)]
    spec = TableSpec(models=tuple(models), methods=tuple(methods), gpus=tuple(gpus), seq_lens=tuple(seq_lens),
                     image_sizes=tuple(sizes), conditions=conditions)
    return Table(stem=USER_STEM, parts=(spec,), command=spec.command())


def _report_check(directory: Path, stale: list[str], regenerate: str, rows: int, json_: bool) -> None:
    if json_:
        print_json({"directory": str(directory), "rows": rows, "stale": stale, "regenerate": regenerate})
    elif not stale:
        typer.echo(f"{directory}: up to date ({rows} rows)")
    else:
        typer.echo(f"error: stale tables in {directory}: {', '.join(stale)} differ from what the code computes "
                   f"(or are missing); regenerate with `{regenerate}`", err=True)
    if stale:
        raise typer.Exit(1)
