"""What a sizing table covers: models x methods x GPU types x sequence lengths x image sizes under one set of
`Conditions`, validated once, so a bad name fails here with one line that says what to change (never halfway
through a long table).

A `Table` is what one output file holds: the union of one or more `TableSpec` crosses (the committed preset sweeps
sequence lengths at one image size and image sizes at one sequence length instead of computing their full cross),
and the command that regenerates it, stated in every output.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, fields

from ..planner.errors import VlplanError
from ..planner.hardware import GPU, find_gpu
from ..planner.registry import names as registry_names
from ..planner.registry import resolve
from .compute import METHODS, Conditions, Row, compute_rows

# The GPU types most fine-tunes run on, smallest first (the default of `vlplan tables --gpus`)
COMMON_GPUS = ("rtx4090-24g", "l40s-48g", "a100-40g", "a100-80g", "h100-80g", "h200-141g")


def size_name(size: tuple[int, int] | None) -> str:
    """(W, H) -> "WxH"; None (no images) -> "-", as `Row.image_size` writes it."""
    return f"{size[0]}x{size[1]}" if size is not None else "-"


@dataclass(frozen=True)
class TableSpec:
    """One cross of models, methods, GPU types, sequence lengths and image sizes (None: no image)."""

    models: tuple[str, ...]
    methods: tuple[str, ...] = METHODS
    gpus: tuple[str, ...] = COMMON_GPUS
    seq_lens: tuple[int, ...] = (2048,)
    image_sizes: tuple[tuple[int, int] | None, ...] = ((768, 768),)
    conditions: Conditions = Conditions()

    def __post_init__(self) -> None:
        for name in ("models", "methods", "gpus", "seq_lens", "image_sizes"):
            values = tuple(getattr(self, name))
            if not values:
                raise VlplanError(f"--{name.replace('_', '-')} is empty; give at least one value")
            if len(set(values)) != len(values):
                raise VlplanError(f"--{name.replace('_', '-')} names a value twice: {', '.join(map(str, values))}")
            object.__setattr__(self, name, values)
        # registry models by their registry name (a hub id or alias gives the same rows); local configs as given
        known = set(registry_names())
        models = tuple(spec.name if spec.name in known else m for m, spec in ((m, resolve(m)) for m in self.models))
        if len(set(models)) != len(models):
            raise VlplanError(f"--models names one model twice: {', '.join(self.models)}")
        object.__setattr__(self, "models", models)
        for method in self.methods:
            if method not in METHODS:
                raise VlplanError(f"--methods: {method!r} is not one of {', '.join(METHODS)}")
        object.__setattr__(self, "gpus", tuple(find_gpu(g).name for g in self.gpus))
        for seq_len in self.seq_lens:
            if not isinstance(seq_len, int) or seq_len <= 0:
                raise VlplanError(f"--seq-lens: {seq_len!r} is not a positive number of tokens")
        for size in self.image_sizes:
            if size is not None and (len(size) != 2 or min(size) <= 0):
                raise VlplanError(f"--image-sizes: {size!r} is not two positive integers, WIDTHxHEIGHT")
        if self.conditions.images == 0 and self.image_sizes != (None,):
            raise VlplanError("--images 0 means rows without images: drop --image-sizes (or pass --image-sizes none)")

    @property
    def gpu_types(self) -> list[GPU]:
        return [find_gpu(name) for name in self.gpus]

    @property
    def row_count(self) -> int:
        return len(self.models) * len(self.methods) * len(self.gpus) * len(self.seq_lens) * len(self.image_sizes)

    def rows(self, workers: int = 1, progress=None) -> list[Row]:
        return compute_rows(list(self.models), list(self.methods), self.gpu_types, list(self.seq_lens),
                            list(self.image_sizes), self.conditions, progress=progress, workers=workers)

    def command(self) -> str:
        """The `vlplan tables` flags that give these rows (conditions only where they differ from the defaults)."""
        parts = ["vlplan tables", "--models", ",".join(self.models), "--methods", ",".join(self.methods),
                 "--gpus", ",".join(self.gpus), "--seq-lens", ",".join(map(str, self.seq_lens)),
                 "--image-sizes", ",".join("none" if s is None else size_name(s) for s in self.image_sizes)]
        default = Conditions()
        for field in fields(Conditions):
            value = getattr(self.conditions, field.name)
            if value == getattr(default, field.name):
                continue
            flag = "--" + field.name.replace("_", "-")
            if isinstance(value, bool):
                parts.append(flag if value else flag.replace("--", "--no-", 1))
            else:
                parts += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        return " ".join(shlex.quote(p) if p != "vlplan tables" else p for p in parts)


@dataclass(frozen=True)
class Table:
    """One table file: the union of `parts` (same conditions), and the command that regenerates it."""

    stem: str  # file names: <stem>.md, <stem>.csv, <stem>_<plot>.png
    parts: tuple[TableSpec, ...]
    command: str

    def __post_init__(self) -> None:
        if not self.parts:
            raise VlplanError("a table needs at least one part")
        if len({part.conditions for part in self.parts}) != 1:
            raise VlplanError("the parts of one table must share their conditions")

    @property
    def conditions(self) -> Conditions:
        return self.parts[0].conditions

    @property
    def models(self) -> tuple[str, ...]:
        return _union(part.models for part in self.parts)

    @property
    def gpus(self) -> tuple[str, ...]:
        return _union(part.gpus for part in self.parts)

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(m for m in METHODS if any(m in part.methods for part in self.parts))

    @property
    def row_count(self) -> int:
        return sum(part.row_count for part in self.parts)

    def rows(self, workers: int = 1, progress=None) -> list[Row]:
        """Every part's rows, each row once, in model, method, sequence length, image pixels, GPU order."""
        rows: dict[tuple, Row] = {}
        for part in self.parts:
            for row in part.rows(workers=workers, progress=progress):
                rows.setdefault((row.model, row.method, row.seq_len, row.image_size, row.gpu), row)
        models, gpus = self.models, self.gpus
        return sorted(rows.values(), key=lambda r: (models.index(r.model), METHODS.index(r.method), r.seq_len,
                                                    image_pixels(r.image_size), gpus.index(r.gpu)))


def image_pixels(image_size: str) -> int:
    """Pixels of a `Row.image_size` ("WxH"; 0 for "-")."""
    if image_size == "-":
        return 0
    width, height = image_size.split("x")
    return int(width) * int(height)


def _union(groups) -> tuple:
    seen: dict = {}
    for group in groups:
        for value in group:
            seen.setdefault(value, None)
    return tuple(seen)
