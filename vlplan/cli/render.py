"""Rendering helpers: bytes in GiB (2**30, labelled GiB), rich tables, JSON."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table

GIB = 2**30
console = Console()


def gib(nbytes: int | float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def table(title: str, columns: list[str], rows: list[list], justify_right: set[int] | None = None) -> Table:
    t = Table(title=title, title_justify="left")
    for index, column in enumerate(columns):
        t.add_column(column, justify="right" if justify_right and index in justify_right else "left")
    for row in rows:
        t.add_row(*[str(cell) for cell in row])
    return t
