"""The memory timeline of a profile as a PNG (matplotlib): measured memory over time with the phases shaded and the
estimate's per-phase live-tensor peaks drawn over the steady-state phases they describe (steps 2..N: the first step
has no optimizer states yet), plus the estimate's device peak where the backend measures device memory."""

from __future__ import annotations

from pathlib import Path

from vlplan.planner.errors import VlplanError
from vlplan.planner.units import GIB

PHASE_COLORS = {"load": "#dddddd", "forward": "#cfe2f3", "loss": "#fce5cd", "backward": "#f4cccc",
                "optimizer": "#d9ead3"}


def plot_timeline(result, path: str | Path) -> Path:
    """Write `result`'s (a ProfileResult) timeline to `path` and return it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise VlplanError("--plot needs matplotlib: pip install 'vlplan[plot]'") from None
    if not result.timeline:
        raise VlplanError("the profile recorded no memory samples to plot")
    path = Path(path)
    largest = max(max(v for v in p[1:] if v is not None) for p in result.timeline)
    unit, scale = ("GiB", GIB) if largest >= GIB else ("MiB", 2**20)
    fig, ax = plt.subplots(figsize=(13, 5.5), dpi=110)
    times = [p[0] for p in result.timeline]
    series = [(1, "allocated (live tensors)", "#1f77b4"), (2, "reserved (caching allocator)", "#ff7f0e"),
              (3, "device used (NVML, this process)", "#2ca02c")]
    for index, label, color in series:
        points = [(t, p[index]) for t, p in zip(times, result.timeline) if p[index] is not None]
        if points:
            ax.step([t for t, _ in points], [v / scale for _, v in points], where="post", label=label, color=color,
                    linewidth=1.2)
    estimate = result.estimate
    labelled = set()
    steady = 2 if result.options.steps >= 2 else 1
    for record in result.records:
        ax.axvspan(record.start_s, record.end_s, color=PHASE_COLORS.get(record.phase, "#eeeeee"), alpha=0.5, lw=0)
        estimated = estimate.phase_allocated_bytes.get(record.phase)
        if estimated is not None and record.step >= steady:  # the estimate is the steady state
            label = "estimate: live tensors per phase" if "phase" not in labelled else None
            labelled.add("phase")
            ax.hlines(estimated / scale, record.start_s, record.end_s, colors="#9467bd", linestyles="--",
                      linewidth=1.5, label=label)
    if result.device_peak_bytes is not None:
        ax.axhline(estimate.peak_bytes / scale, color="#d62728", linestyle=":", linewidth=1.2,
                   label=f"estimate: device peak {estimate.peak_bytes / GIB:.2f} GiB")
    _phase_labels(ax, result.records)
    s = result.setup
    device = result.device.get("name", result.options.backend)
    ax.set_title(f"{s.model.name} {s.method}: seq {s.seq_len} x batch {s.batch_size}, "
                 f"{len(s.images)} image(s), checkpointing {'on' if s.gradient_checkpointing else 'off'} on {device}"
                 + (" (out of memory)" if result.oom else ""), fontsize=10)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(unit)
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _phase_labels(ax, records) -> None:
    """The phase name over each phase of the first steps (later steps repeat them)."""
    top = ax.get_ylim()[1]
    for record in records:
        if record.step <= 1 and record.end_s > record.start_s:
            ax.text((record.start_s + record.end_s) / 2, top * 0.97, record.phase, ha="center", va="top",
                    fontsize=7, rotation=90, color="#555555")
