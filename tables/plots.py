"""Plots of a table's rows (matplotlib, imported only here and only when plots are asked for):

- `<stem>_max_micro_batch.png`: heatmap, models x GPU types, one panel per method: the largest micro-batch one GPU
  holds;
- `<stem>_fewest_gpus.png`: the same grid: the fewest GPUs of each type that hold micro-batch 1, with the ZeRO stage;
- `<stem>_peak_vs_image_pixels.png`, `<stem>_peak_vs_seq_len.png`: the peak at micro-batch 1, one panel per method,
  a line per model (drawn only where the table has at least two image sizes / sequence lengths);
- `<stem>_breakdown.png`: the terms of the peak, one panel per model, a stacked bar per method
  (`estimate(row_setup(...)).breakdown_bytes`, grouped by their first name part: weights, optimizer, ...).

The heatmaps and the breakdown show one sequence length and image size (`reference`); the files return as PNG bytes
(`plots(...)`), tagged with "vlplan tables" in their Software field so `--out` knows them as generated.
"""

from __future__ import annotations

import io
import math

from .. import __version__
from ..planner.errors import VlplanError
from ..planner.hardware import find_gpu
from ..planner.memory.estimate import estimate
from ..planner.units import GIB, MIB
from .compute import GPU_COUNTS, MAX_MICRO_BATCH, Row, row_setup
from .formats import GENERATED_MARK
from .spec import Table, image_pixels

LF_CUTOFF_LEN = 2048  # LLaMA-Factory's cutoff_len default: the sequence length the one-point plots prefer
PLOT_NAMES = ("max_micro_batch", "fewest_gpus", "peak_vs_image_pixels", "peak_vs_seq_len", "breakdown")
CATEGORY_COLORS = {"weights": "#4c72b0", "adapters": "#64b5cd", "gradients": "#dd8452", "optimizer": "#c44e52",
                   "activations": "#55a868", "temporaries": "#8172b3", "inputs": "#937860", "zero": "#da8bc3",
                   "ddp": "#ccb974", "cuda": "#8c8c8c"}
PLOT_PANEL_COLUMNS = 4


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise VlplanError("--plot needs matplotlib: pip install 'vlplan[plot]'") from None


def reference(rows: list[Row], table: Table) -> tuple[int, str, str]:
    """The sequence length, image size and GPU the one-point plots show: the (sequence, image) pair with the most
    valid rows, nearest LLaMA-Factory's cutoff_len and image_max_pixels defaults on ties; h100-80g where present."""
    counts: dict[tuple[int, str], int] = {}
    for row in rows:
        if row.peak_bytes is not None:
            counts[(row.seq_len, row.image_size)] = counts.get((row.seq_len, row.image_size), 0) + 1
    if not counts:
        raise VlplanError("no valid rows to plot: every setup of the table is invalid (see the note column)")
    default_pixels = 768 * 768
    seq_len, image = max(counts, key=lambda k: (counts[k], -abs(math.log2(k[0] / LF_CUTOFF_LEN)),
                                                -abs(image_pixels(k[1]) - default_pixels), -k[0]))
    gpus = table.gpus
    gpu = "h100-80g" if "h100-80g" in gpus else next((g for g in gpus if find_gpu(g).bf16), gpus[0])
    return seq_len, image, gpu


def plot_names(table: Table, rows: list[Row]) -> list[str]:
    """The files `plots` writes for these rows (without matplotlib: `vlplan tables --check` needs only the names)."""
    if not any(r.peak_bytes is not None for r in rows):
        return []
    seq_len, image, gpu = reference(rows, table)
    drawn = {"peak_vs_image_pixels": _sweep_fixed(rows, gpu, "image") is not None,
             "peak_vs_seq_len": _sweep_fixed(rows, gpu, "seq_len") is not None,
             "breakdown": bool(_breakdown_models(table, rows, seq_len, image, gpu))}
    return [f"{table.stem}_{name}.png" for name in PLOT_NAMES if drawn.get(name, True)]
    return [f"{table.stem}_{name}.png" for name in drawn]


def plots(table: Table, rows: list[Row]) -> dict[str, bytes]:
    """File name -> PNG bytes of `plot_names(table, rows)`."""
    require_matplotlib()
    seq_len, image, gpu = reference(rows, table)
    figures = {"max_micro_batch": _heatmap(table, rows, seq_len, image, "max_micro_batch"),
               "fewest_gpus": _heatmap(table, rows, seq_len, image, "fewest_gpus"),
               "peak_vs_image_pixels": _sweep(table, rows, gpu, "image"),
               "peak_vs_seq_len": _sweep(table, rows, gpu, "seq_len"),
               "breakdown": _breakdown(table, rows, seq_len, image, gpu)}
    files = {f"{table.stem}_{name}.png": _png(figure) for name, figure in figures.items() if figure is not None}
    assert list(files) == plot_names(table, rows)
    return files


def _png(figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": f"{GENERATED_MARK} {__version__}"})
    return buffer.getvalue()


def _panels(count: int, panel_width: float, panel_height: float, columns: int = PLOT_PANEL_COLUMNS):
    from matplotlib.figure import Figure

    columns = min(columns, count)
    lines = -(-count // columns)
    figure = Figure(figsize=(panel_width * columns, panel_height * lines + 0.8), layout="constrained")
    axes = figure.subplots(lines, columns, squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return figure, list(axes.flat[:count])


def _heatmap(table: Table, rows: list[Row], seq_len: int, image: str, value: str):
    import numpy as np

    models, gpus, methods = table.models, table.gpus, table.methods
    by_key = {(r.model, r.method, r.gpu): r for r in rows if r.seq_len == seq_len and r.image_size == image}
    figure, axes = _panels(len(methods), 1.0 + 0.75 * len(gpus), 0.8 + 0.32 * len(models), columns=2)
    if value == "max_micro_batch":
        title = f"largest micro-batch on one GPU (seq {seq_len}, image {image}; '-': micro-batch 1 does not fit)"
        cmap, vmin, vmax = "viridis", 0, MAX_MICRO_BATCH
    else:
        title = (f"fewest GPUs holding micro-batch 1, without offload (seq {seq_len}, image {image}; "
                 "Z = ZeRO stage)")
        cmap, vmin, vmax = "magma_r", 0, math.log2(GPU_COUNTS[-1]) + 1
    for ax, method in zip(axes, methods):
        grid = np.full((len(models), len(gpus)), np.nan)
        for i, model in enumerate(models):
            for j, gpu in enumerate(gpus):
                row = by_key.get((model, method, gpu))
                if row is None or row.peak_bytes is None:
                    text = "n/a"
                elif value == "max_micro_batch":
                    grid[i, j] = row.max_micro_batch or 0
                    mb = row.max_micro_batch
                    text = "-" if mb is None else f">={MAX_MICRO_BATCH}" if mb >= MAX_MICRO_BATCH else str(mb)
                elif row.fewest_gpus is None:
                    grid[i, j] = vmax
                    text = f">{GPU_COUNTS[-1]}"
                else:
                    grid[i, j] = math.log2(row.fewest_gpus)
                    stage = "" if row.strategy in ("single GPU", "DDP") else " Z" + row.strategy.removeprefix("ZeRO-")
                    text = f"{row.fewest_gpus}{stage}"
                shade = grid[i, j]
                dark = not np.isnan(shade) and (shade - vmin) / (vmax - vmin) < 0.5
                if value == "fewest_gpus":
                    dark = not dark
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
        ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(gpus)), gpus, rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(len(models)), models, fontsize=8)
        ax.set_title(method, fontsize=10)
    figure.suptitle(title, fontsize=10)
    return figure


def _sweep(table: Table, rows: list[Row], gpu: str, along: str):
    """Along the sequence length (at the image size with the most sequence lengths): the peak at micro-batch 1 on
    `gpu`. Along image pixels (at the sequence length with the most image sizes): the peak's change from the smallest
    image, in MiB: at a fixed sequence length an image's tokens take the place of text tokens, so what moves is the
    vision tower's share, too small to see on the peak's own scale. None when no line would have two points."""
    from matplotlib.ticker import FuncFormatter

    fixed = _sweep_fixed(rows, gpu, along)
    if fixed is None:
        return None
    fixed_name = "seq_len" if along == "image" else "image_size"
    valid = [r for r in rows if r.gpu == gpu and r.peak_bytes is not None and getattr(r, fixed_name) == fixed]
    methods = table.methods
    figure, axes = _panels(len(methods), 5.0, 3.4, columns=2)
    for ax, method in zip(axes, methods):
        for model in table.models:
            points = sorted((image_pixels(r.image_size) if along == "image" else r.seq_len, r.peak_bytes)
                            for r in valid if r.model == model and r.method == method)
            if not points:
                continue
            ys = [(p - points[0][1]) / MIB for _, p in points] if along == "image" else [p / GIB for _, p in points]
            ax.plot([p[0] for p in points], ys, marker="o", markersize=3, linewidth=1, label=model)
        ax.set_xscale("log", base=2)
        ticks = sorted({image_pixels(r.image_size) if along == "image" else r.seq_len for r in valid})
        ax.set_xticks(ticks, [_pixels_label(t) if along == "image" else str(t) for t in ticks])
        ax.xaxis.set_minor_locator(_no_ticks())
        if along == "image":
            ax.set_ylabel("peak - peak at the smallest image (MiB)", fontsize=8)
        else:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
            ax.set_ylabel("peak at micro-batch 1 (GiB)", fontsize=8)
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("image pixels (W x H)" if along == "image" else "sequence length (tokens)", fontsize=8)
        ax.tick_params(labelsize=7, which="both")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right center", fontsize=7)
    if along == "image":
        title = (f"per-GPU peak at micro-batch 1 minus the peak at the smallest image (one {gpu}, {fixed} tokens per "
                 "sample)\nat a fixed sequence length, image tokens take the place of text tokens; flat lines: "
                 "processors that give every image the same tokens")
    else:
        title = f"per-GPU peak at micro-batch 1 on one {gpu} (image {fixed})"
    figure.suptitle(title, fontsize=10)
    return figure


def _pixels_label(pixels: int) -> str:
    return f"{pixels / 1e6:.2f} M" if pixels >= 1e6 else f"{pixels / 1e3:.0f} k"


def _no_ticks():
    from matplotlib.ticker import NullLocator

    return NullLocator()


def _sweep_fixed(rows: list[Row], gpu: str, along: str):
    """The sequence length (along="image") or image size (along="seq_len") with the most valid points along the
    other (the longest sequence / the smallest image on ties); None when no line would have two points."""
    fixed_name, moving = ("seq_len", "image_size") if along == "image" else ("image_size", "seq_len")
    spread: dict = {}
    for row in rows:
        if row.gpu == gpu and row.peak_bytes is not None:
            spread.setdefault(getattr(row, fixed_name), set()).add(getattr(row, moving))
    if not spread or max(len(v) for v in spread.values()) < 2:
        return None
    return max(spread, key=lambda k: (len(spread[k]), k if along == "image" else -image_pixels(k)))


def _breakdown_models(table: Table, rows: list[Row], seq_len: int, image: str, gpu: str) -> list[str]:
    """The models with a valid row on `gpu` at the sequence length and image size."""
    valid = {r.model for r in rows
             if r.gpu == gpu and r.seq_len == seq_len and r.image_size == image and r.peak_bytes is not None}
    return [m for m in table.models if m in valid]


def _breakdown(table: Table, rows: list[Row], seq_len: int, image: str, gpu: str):
    size = None if image == "-" else tuple(int(v) for v in image.split("x"))
    models = _breakdown_models(table, rows, seq_len, image, gpu)
    if not models:
        return None
    valid = {(r.model, r.method) for r in rows
             if r.gpu == gpu and r.seq_len == seq_len and r.image_size == image and r.peak_bytes is not None}
    figure, axes = _panels(len(models), 3.2, 3.0, columns=5)
    used: dict[str, None] = {}
    for ax, model in zip(axes, models):
        for x, method in enumerate(table.methods):
            if (model, method) not in valid:
                continue
            result = estimate(row_setup(model, method, seq_len, size, find_gpu(gpu), table.conditions))
            totals: dict[str, int] = {}
            for name, value in result.breakdown_bytes.items():
                category = name.split("/")[0]
                totals[category] = totals.get(category, 0) + value
            bottom = 0.0
            for category in CATEGORY_COLORS:
                if totals.get(category):
                    ax.bar(x, totals[category] / GIB, bottom=bottom, color=CATEGORY_COLORS[category], width=0.7,
                           label=category if category not in used else None)
                    used.setdefault(category, None)
                    bottom += totals[category] / GIB
            ax.text(x, bottom, f"{bottom:.1f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(table.methods)), table.methods, fontsize=8)
        ax.set_title(model, fontsize=9)
        ax.set_ylabel("GiB", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.margins(y=0.12)
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    order = [c for c in CATEGORY_COLORS if c in handles]
    figure.legend([handles[c] for c in order], order, loc="outside right center", fontsize=8)
    figure.suptitle(f"what the peak at micro-batch 1 holds (one {gpu}, seq {seq_len}, image {image})", fontsize=10)
    return figure
