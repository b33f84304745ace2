"""Rendering helpers: bytes in GiB (2**30, labelled GiB), rich tables, JSON."""

from __future__ import annotations

import json
import os
import sys

from rich.console import Console, ConsoleDimensions
from rich.table import Table

from vlplan.planner.units import GIB

# Width of output to a pipe or file (no COLUMNS set): wide enough that a table row or a message stays one line for
# grep and friends, instead of rich's 80-column assumption folding it
PIPE_WIDTH = 1000


class _Console(Console):
    """rich's Console, except that output to a pipe or a file is not wrapped at 80 columns (see `PIPE_WIDTH`); a
    terminal, or COLUMNS, sets the width as usual."""

    @property
    def size(self) -> ConsoleDimensions:
        if self._width is None and not self.is_terminal and not os.environ.get("COLUMNS", "").isdigit():
            return ConsoleDimensions(PIPE_WIDTH, super().size.height)
        return super().size

    @size.setter
    def size(self, new_size) -> None:
        Console.size.fset(self, new_size)


console = _Console()


def gib(nbytes: int | float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def gib_or_dash(nbytes: int | float | None) -> str:
    return gib(nbytes) if nbytes is not None else "-"


def percent(error: float | None) -> str:
    """A signed relative error as a percentage, "-" where there is none."""
    return f"{100 * error:+.1f}%" if error is not None else "-"


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def table(title: str, columns: list[str], rows: list[list], justify_right: set[int] | None = None,
          keep: set[int] = frozenset({0})) -> Table:
    """A rich table that never cuts a value: in a narrow terminal or a pipe (rich then assumes 80 columns) cells
    fold onto more lines instead of ending in an ellipsis, and the `keep` columns (the names users type: the first
    by default) and the numbers (`justify_right`) are never folded at all."""
    cells = [[str(cell) for cell in row] for row in rows]
    t = Table(title=title, title_justify="left")
    for index, column in enumerate(columns):
        kept = index in keep or bool(justify_right and index in justify_right)
        width = max([len(row[index]) for row in cells], default=0) or None if kept else None  # headers may wrap
        t.add_column(column, justify="right" if justify_right and index in justify_right else "left",
                     overflow="fold", no_wrap=kept, min_width=width)
    for row in cells:
        t.add_row(*row)
    return t
