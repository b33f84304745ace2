"""A table's files from its rows, written into a folder or compared with one (`vlplan tables --out/--check`)."""

from __future__ import annotations

from pathlib import Path

from ..planner.errors import VlplanError
from .compute import Row
from .formats import FORMATS, render
from .output import stale_files, write_files
from .spec import Table


def data_files(table: Table, rows: list[Row], formats: tuple[str, ...]) -> dict[str, str]:
    for fmt in formats:
        if fmt not in FORMATS:
            raise VlplanError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    return {f"{table.stem}.{fmt}": render(fmt, table, rows) for fmt in formats}


def write_table(directory: Path, table: Table, rows: list[Row], formats: tuple[str, ...], plot: bool) -> list[Path]:
    """Write the data files (and with `plot` the PNG plots) into `directory`; the written paths."""
    files: dict[str, str | bytes] = dict(data_files(table, rows, formats))
    if plot:
        from .plots import plots

        files.update(plots(table, rows))
    return write_files(directory, files)


def check_table(directory: Path, table: Table, rows: list[Row], formats: tuple[str, ...], plot: bool) -> list[str]:
    """The files of `directory` that are not what `write_table` would write now (data files compared byte for
    byte, plots by presence)."""
    from .plots import plot_names

    return stale_files(directory, data_files(table, rows, formats), plot_names(table, rows) if plot else [])
