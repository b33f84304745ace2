"""Calibration: the estimator's named overhead constants (planner/memory/overheads.py) derived from profile records,
and the estimate-vs-measured comparison table for docs/accuracy.md.

Records are the objects `vlplan profile --sweep` appends to benchmarks/results/gpu-<device>-<date>.json
(`ProfileResult.to_record`). Only records of the cuda backend without an error count; out-of-memory records count
for nothing but the under-prediction tally (an OOM whose estimate said it fits is an under-prediction).

How each constant is derived (the estimate should not under-predict, so each takes the largest value measured):
(the caching allocator's reserve is not a constant: the estimate replays the step through a model of the allocator,
and each profile compares its `cuda/allocator_reserve` with reserved - allocated measured, `ProfileResult.cuda_terms`)

- CUDA_CONTEXT_BYTES: `overheads.non_allocator_bytes`, NVML's used memory beyond the caching allocator's segments at
  the end of the steps (context, lazily loaded kernels, library handles), rounded up to a MiB.
- CUBLAS_WORKSPACE_HOPPER_BYTES / CUBLAS_WORKSPACE_OTHER_BYTES: `overheads.cublas_workspace_bytes` (what a forward
  and a backward matmul leave allocated) divided by CUBLAS_WORKSPACES handles, per kind of GPU.
- NCCL_BYTES: `overheads.nccl_buffers_bytes` of records with more than one rank; `vlplan profile` runs one process,
  so these come from multi-GPU runs only; without such records the constant is reported as not measured.
- PROCESS_HOST_BYTES: the profile process's peak resident set (`host_rss_peak_bytes`), rounded up to 64 MiB.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from vlplan.planner.errors import VlplanError
from vlplan.planner.memory import overheads
from vlplan.planner.units import GIB, MIB

HOPPER_MARKERS = ("H100", "H200", "H20", "H800", "GH200")


@dataclass
class DerivedConstant:
    name: str
    current: float
    derived: float | None
    unit: str  # "bytes" or "fraction"
    values: list[float]
    rule: str
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def largest(self) -> float | None:
        return max(self.values) if self.values else None

    def to_dict(self) -> dict:
        return {"name": self.name, "current": self.current, "derived": self.derived, "unit": self.unit,
                "records": len(self.values), "median": self.median, "max": self.largest, "rule": self.rule,
                "note": self.note}


@dataclass
class Calibration:
    constants: list[DerivedConstant]
    devices: list[str]
    versions: list[dict]
    dates: list[str]
    records: int
    used: int

    def to_dict(self) -> dict:
        return {"constants": [c.to_dict() for c in self.constants], "devices": self.devices,
                "versions": self.versions, "dates": self.dates, "records": self.records, "records_used": self.used}


def read_record_files(paths: list[str | Path]) -> list[dict]:
    from .sweep import read_records

    if not paths:
        raise VlplanError("--calibrate needs results files, e.g. benchmarks/results/gpu-*.json")
    records = []
    for path in paths:
        if not Path(path).is_file():
            raise VlplanError(f"results file {path} does not exist")
        records += read_records(Path(path))
    return records


def usable(records: list[dict]) -> list[dict]:
    """Records measured on a CUDA device, without an error or an out-of-memory end."""
    return [r for r in records if r.get("backend", "cuda") == "cuda" and not r.get("error") and not r.get("oom")]


def _round_up(value: float, step: float) -> float:
    return math.ceil(value / step) * step


def _overhead(record: dict, key: str):
    return (record.get("overheads") or {}).get(key)


def is_hopper(device: str) -> bool:
    return any(marker in (device or "").upper() for marker in HOPPER_MARKERS)


def calibrate(records: list[dict]) -> Calibration:
    good = usable(records)
    constants = []
    context = [float(v) for r in good if (v := _overhead(r, "non_allocator_bytes")) is not None]
    constants.append(DerivedConstant(
        "CUDA_CONTEXT_BYTES", overheads.CUDA_CONTEXT_BYTES, _round_up(max(context), MIB) if context else None,
        "bytes", context, "max of NVML used - reserved at the end of the steps, rounded up to a MiB"))
    for name, hopper in (("CUBLAS_WORKSPACE_HOPPER_BYTES", True), ("CUBLAS_WORKSPACE_OTHER_BYTES", False)):
        values = [float(v) / overheads.CUBLAS_WORKSPACES for r in good
                  if is_hopper(r.get("device")) == hopper and (v := _overhead(r, "cublas_workspace_bytes"))]
        constants.append(DerivedConstant(
            name, getattr(overheads, name), max(values) if values else None, "bytes", values,
            f"max of the measured workspace bytes / {overheads.CUBLAS_WORKSPACES} handles, "
            f"{'Hopper' if hopper else 'non-Hopper'} GPUs"))
    nccl = [float(v) for r in good if (r.get("config") or {}).get("world_size", 1) > 1
            and (v := _overhead(r, "nccl_buffers_bytes")) is not None]
    constants.append(DerivedConstant(
        "NCCL_BYTES", overheads.NCCL_BYTES, _round_up(max(nccl), MIB) if nccl else None, "bytes", nccl,
        "max of the NCCL buffers measured in multi-GPU records, rounded up to a MiB",
        "" if nccl else "not measured: profile runs one process; needs records of multi-GPU runs"))
    host = [float(v) for r in good if (v := r.get("host_rss_peak_bytes"))]
    constants.append(DerivedConstant(
        "PROCESS_HOST_BYTES", overheads.PROCESS_HOST_BYTES, _round_up(max(host), 64 * MIB) if host else None,
        "bytes", host, "max of the profile process's peak resident set, rounded up to 64 MiB"))
    versions = []
    for r in good:
        v = {"torch": r.get("torch"), "transformers": r.get("transformers"),
             "cuda": (r.get("versions") or {}).get("cuda")}
        if v not in versions:
            versions.append(v)
    return Calibration(constants, sorted({r.get("device") for r in good if r.get("device")}), versions,
                       sorted({(r.get("date") or "")[:10] for r in good if r.get("date")}), len(records), len(good))


# The comparison table -----------------------------------------------------------------------------------------------
@dataclass
class ComparisonRow:
    label: str
    device: str
    estimate_bytes: int | None
    measured_bytes: int | None
    oom: bool
    estimate_fits: bool | None

    @property
    def error(self) -> float | None:
        """(estimate - measured) / measured; negative: the estimate was too low."""
        if self.estimate_bytes is None or not self.measured_bytes:
            return None
        return (self.estimate_bytes - self.measured_bytes) / self.measured_bytes

    @property
    def under_predicted(self) -> bool:
        """Too low: below the measurement, or out of memory where the estimate said it fits."""
        if self.oom:
            return bool(self.estimate_fits)
        return self.error is not None and self.error < 0

    def to_dict(self) -> dict:
        return {"label": self.label, "device": self.device, "estimate_bytes": self.estimate_bytes,
                "measured_bytes": self.measured_bytes, "error": self.error, "oom": self.oom,
                "under_predicted": self.under_predicted}


@dataclass
class Comparison:
    measure: str
    rows: list[ComparisonRow]
    devices: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    dates: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[float]:
        return [r.error for r in self.rows if r.error is not None]

    @property
    def median_abs_error(self) -> float | None:
        return statistics.median(abs(e) for e in self.errors) if self.errors else None

    @property
    def worst_error(self) -> float | None:
        """The error of largest magnitude, with its sign."""
        return max(self.errors, key=abs) if self.errors else None

    @property
    def under_predictions(self) -> int:
        return sum(r.under_predicted for r in self.rows)

    def to_dict(self) -> dict:
        return {"measure": self.measure, "rows": [r.to_dict() for r in self.rows],
                "median_abs_error": self.median_abs_error, "worst_error": self.worst_error,
                "under_predictions": self.under_predictions, "compared": len(self.errors),
                "ooms": sum(r.oom for r in self.rows), "devices": self.devices, "versions": self.versions,
                "dates": self.dates}

    def to_markdown(self) -> str:
        """A summary line and a table to paste into docs/accuracy.md."""
        what = ("device peak (estimate `peak_bytes` vs NVML used)" if self.measure == "peak" else
                "live tensors (estimate `allocated_peak_bytes` vs max_memory_allocated less cuBLAS workspaces)")
        median, worst = self.median_abs_error, self.worst_error
        lines = [f"Measured {', '.join(self.dates) or '(no date)'} on {', '.join(self.devices) or '(no device)'} with "
                 f"{'; '.join(self.versions) or '(no versions)'}; {what}; {len(self.errors)} configurations"
                 + (f" ({sum(r.oom for r in self.rows)} out of memory)" if any(r.oom for r in self.rows) else "")
                 + ": median |error| "
                 + (f"**{100 * median:.1f}%**, worst **{100 * worst:+.1f}%**" if median is not None else "n/a")
                 + f", under-predictions **{self.under_predictions}**.", "",
                 "| configuration | device | estimate | measured | error |", "|---|---|---:|---:|---:|"]
        for r in self.rows:
            estimate = f"{r.estimate_bytes / GIB:.2f} GiB" if r.estimate_bytes is not None else "-"
            measured = ("out of memory" if r.oom else f"{r.measured_bytes / GIB:.2f} GiB"
                        if r.measured_bytes is not None else "-")
            error = f"{100 * r.error:+.1f}%" if r.error is not None else ("under" if r.under_predicted else "-")
            lines.append(f"| {r.label} | {r.device} | {estimate} | {measured} | {error} |")
        return "\n".join(lines) + "\n"


def compare(records: list[dict], measure: str = "peak") -> Comparison:
    """Per record: estimate vs measured (`peak`: the estimate's peak_bytes vs the NVML-used peak; `allocated`: its
    allocated_peak_bytes vs max_memory_allocated less the measured cuBLAS workspaces), with error %, the median
    |error|, the worst error and the under-predictions. Records with an error other than OOM are left out."""
    if measure not in ("peak", "allocated"):
        raise VlplanError(f"comparison measure {measure!r} is not peak or allocated")
    from .sweep import config_label_of

    rows = []
    kept = [r for r in records if not r.get("error")]
    for r in kept:
        if measure == "peak":
            estimated, measured = r.get("estimate_peak_bytes"), r.get("measured_peak_bytes")
        else:
            estimated = r.get("estimate_allocated_peak_bytes")
            measured = r.get("measured_allocated_peak_bytes")
            if measured is not None:
                measured -= _overhead(r, "cublas_workspace_bytes") or 0
        capacity = r.get("capacity_bytes")
        fits = None if capacity is None or estimated is None else estimated <= capacity
        rows.append(ComparisonRow(config_label_of(r), r.get("device") or "", estimated,
                                  None if r.get("oom") else measured, bool(r.get("oom")), fits))
    versions = sorted({f"torch {r.get('torch')}, transformers {r.get('transformers')}" for r in kept})
    return Comparison(measure, rows, sorted({r.get("device") for r in kept if r.get("device")}), versions,
                      sorted({(r.get("date") or "")[:10] for r in kept if r.get("date")}))
