"""A run's files in its output directory: the emptiness check, checkpoints, `vlplan_run.json`, measured peaks.

`OUT/checkpoint-N` directories are complete (the trainer renames them into place from `OUT/.vlplan/staging`);
`OUT/vlplan_run.json` is replaced atomically at every checkpoint and at the end; `--overwrite` deletes only what a
vlplan run wrote (checkpoints, the record, the staging area).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from vlplan.planner.errors import VlplanError

from .job import RunOptions

RECORD_NAME = "vlplan_run.json"
STATE_DIR = ".vlplan"  # inside the output directory: staging area and the out-of-memory report
STAGING_NAME = "staging"
OOM_REPORT_NAME = "oom.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# A measured peak further than this from the estimate gets a warning in the record
ESTIMATE_TOLERANCE = 0.10


def last_checkpoint(output_dir: Path) -> Path | None:
    """The output directory's checkpoint-N with the highest N (a complete one: renamed into place by the trainer)."""
    if not output_dir.is_dir():
        return None
    steps = [(int(m.group(1)), path) for path in output_dir.iterdir()
             if (m := CHECKPOINT_PATTERN.match(path.name)) and (path / "trainer_state.json").is_file()]
    return max(steps)[1] if steps else None


def prepare_output_dir(options: RunOptions) -> Path | None:
    """Check the output directory before anything is written; the checkpoint a --resume continues from.

    A non-empty directory is refused unless --resume (continue its last checkpoint) or --overwrite (replace what an
    earlier vlplan run wrote there: its checkpoints, record and staging area; nothing else is deleted).
    """
    out = options.output_path
    if out.exists() and not out.is_dir():
        raise VlplanError(f"--output-dir {out} is a file; pass a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if options.resume:
        checkpoint = last_checkpoint(out)
        if checkpoint is None:
            raise VlplanError(f"--resume: {out} holds no checkpoint-N directory to continue from")
        return checkpoint
    if entries and not options.overwrite:
        raise VlplanError(f"--output-dir {out} is not empty ({len(entries)} entries); pass --resume to continue its "
                          "last checkpoint, --overwrite to replace it, or a new directory")
    if options.overwrite:
        for entry in entries:
            path = out / entry
            if (CHECKPOINT_PATTERN.match(entry) and path.is_dir()) or entry == STATE_DIR:
                shutil.rmtree(path)
            elif entry == RECORD_NAME:
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return None


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_record(output_dir: Path) -> dict | None:
    path = output_dir / RECORD_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def nvml_used_bytes() -> int | None:
    """The device memory NVML sees in use on this process's GPU (CUDA context included; other processes' too)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()  # reference-counted: cheap after the first call
        index = torch.cuda.current_device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            index = int(visible.split(",")[index])
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
    except (pynvml.NVMLError, ValueError, IndexError):
        return None


def measured_peaks(result, warnings: list[str], nvml_peak_bytes: int) -> dict | None:
    """CUDA peaks (the max over ranks when distributed) against the estimate: the allocator's live-tensor peak
    against the estimated live-tensor peak, its reserved peak against the estimated peak less the CUDA context, and
    NVML's device memory in use (sampled at step ends, when the caching allocator still holds the step's peak)
    against the estimated peak."""
    if not torch.cuda.is_available():
        return None
    peaks = torch.tensor([torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved(), nvml_peak_bytes],
                         dtype=torch.long, device="cuda")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
    allocated, reserved, nvml = (int(v) for v in peaks.tolist())
    context = result.breakdown_bytes.get("cuda/context", 0)
    comparisons = {"allocated": (allocated, result.allocated_peak_bytes),
                   "reserved": (reserved, result.peak_bytes - context)}
    if nvml:
        comparisons["nvml_used"] = (nvml, result.peak_bytes)
    measured = {"device": torch.cuda.get_device_name(), "max_memory_allocated_bytes": allocated,
                "max_memory_reserved_bytes": reserved, "nvml_used_peak_bytes": nvml or None,
                "estimate_peak_bytes": result.peak_bytes, "estimate_allocated_peak_bytes": result.allocated_peak_bytes,
                "relative_error": {}}
    for name, (value, estimated) in comparisons.items():
        error = (value - estimated) / estimated
        measured["relative_error"][name] = round(error, 4)
        if abs(error) > ESTIMATE_TOLERANCE:
            warnings.append(f"measured peak ({name}) {value / 2**30:.2f} GiB is {100 * error:+.0f}% off the estimate "
                            f"{estimated / 2**30:.2f} GiB")
    return measured
