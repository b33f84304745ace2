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
from vlplan.planner.oom import ESTIMATE_TOLERANCE
from vlplan.planner.units import GIB

from .job import RunOptions

RECORD_NAME = "vlplan_run.json"
STATE_DIR = ".vlplan"  # inside the output directory: staging area and the out-of-memory report
STAGING_NAME = "staging"
OOM_REPORT_NAME = "oom.json"
TINY_MODEL_DIR = "tiny-model"  # the smoke test's model, inside the output directory
# What a vlplan run writes into its output directory before its first checkpoint
RUN_ENTRIES = frozenset({RECORD_NAME, STATE_DIR, TINY_MODEL_DIR})
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


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
    earlier vlplan run wrote there: its checkpoints, record and staging area; nothing else is deleted). One exception:
    a directory holding only an earlier vlplan run that failed or was interrupted before its first checkpoint (its
    record says so) is run into again, since there is nothing of that run to continue or to lose.
    """
    out = options.output_path
    if out.exists() and not out.is_dir():
        raise VlplanError(f"--output-dir {out} is a file; pass a directory")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise VlplanError(f"--output-dir {out}: {parent} is a file, not a directory")
            break
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    record = read_record(out) if entries else None
    checkpoint = last_checkpoint(out)
    status = record.get("status") if record else None
    if options.resume:
        if checkpoint is None:
            raise VlplanError(_nothing_to_resume(out, record))
        return checkpoint
    if entries and not options.overwrite:
        if checkpoint is None and status in ("failed", "interrupted") and set(entries) <= RUN_ENTRIES:
            _remove(out, [e for e in entries if e != TINY_MODEL_DIR])  # the smoke test's tiny model is reused
        else:
            raise VlplanError(_not_empty(out, entries, status, checkpoint))
    elif options.overwrite:
        _remove(out, entries)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise VlplanError(f"cannot create --output-dir {out}: {err.strerror or err}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise VlplanError(f"--output-dir {out} is not writable; pass a directory you can write to")
    return None


def _remove(out: Path, entries: list[str]) -> None:
    """Delete what a vlplan run wrote among `entries` (checkpoints, record, staging area); nothing else."""
    for entry in entries:
        path = out / entry
        if (CHECKPOINT_PATTERN.match(entry) and path.is_dir()) or entry == STATE_DIR:
            shutil.rmtree(path)
        elif entry == RECORD_NAME:
            path.unlink()


def _not_empty(out: Path, entries: list[str], status: str | None, checkpoint: Path | None) -> str:
    head = f"--output-dir {out} is not empty ({len(entries)} entries)"
    if status == "running" and checkpoint is None:
        return (f"{head}: its {RECORD_NAME} says a run is running there and it has no checkpoint (the run is still "
                "going, or was killed before it could say); if none is running, pass --overwrite (there is no "
                "checkpoint to lose), or a new directory")
    if status == "completed":
        return f"{head}: it holds a completed run; pass a new directory, or --overwrite to replace that run"
    return (f"{head}; pass --resume to continue its last checkpoint, --overwrite to replace it, or a new "
            "directory")


def _nothing_to_resume(out: Path, record: dict | None) -> str:
    head = f"--resume: {out} holds no checkpoint-N directory to continue from"
    status = record.get("status") if record else None
    if status == "failed":
        error = f" ({record['error']})" if record.get("error") else ""
        return f"{head}: its run failed before its first checkpoint{error}; run again without --resume to start over"
    if status == "interrupted":
        return (f"{head}: its run was interrupted ({record.get('signal', 'a signal')}) before its first checkpoint; "
                "run again without --resume to start over")
    if status == "running":
        return (f"{head}: its {RECORD_NAME} says a run is running there (still going, or killed before it could "
                "say); if none is running, pass --overwrite instead of --resume to start over")
    return head


# Settings a checkpoint's weights and optimizer states depend on: a resume with any other value cannot load them
RESUME_KEYS = ("model", "method", "vision", "projector", "language", "freeze_trainable_layers", "quant_bits", "zero")
RESUME_LORA_KEYS = ("rank", "targets", "dora")


def check_resume(setup_settings: dict, options: RunOptions) -> None:
    """Refuse a --resume whose model or trained parameters differ from the run in the output directory (its
    checkpoints would not load, or would load into a different model), naming what differs."""
    record = read_record(options.output_path)
    if not options.resume or record is None:
        return
    before = record.get("settings") or {}
    differ = []
    old_path, new_path = record.get("model"), options.model
    if old_path is not None and old_path != new_path and _real(old_path) != _real(new_path):
        differ.append(f"--model {old_path} -> {new_path}")
    for key in RESUME_KEYS:
        if key in before and before[key] != setup_settings.get(key):
            if key == "model" and differ:
                continue
            differ.append(f"{key} {before[key]} -> {setup_settings.get(key)}")
    old_lora, new_lora = before.get("lora") or {}, setup_settings.get("lora") or {}
    uses_lora = before.get("method") in ("lora", "qlora")
    for key in RESUME_LORA_KEYS if uses_lora else ():
        if key in old_lora and old_lora[key] != new_lora.get(key):
            differ.append(f"lora {key} {old_lora[key]} -> {new_lora.get(key)}")
    if differ:
        raise VlplanError(f"--resume: {options.output_path} was trained with other settings ({'; '.join(differ)}); "
                          "resume with the run's own settings, or pass a new --output-dir")


def _real(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if Path(path).expanduser().exists() else path


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
            warnings.append(f"measured peak ({name}) {value / GIB:.2f} GiB is {100 * error:+.0f}% off the estimate "
                            f"{estimated / GIB:.2f} GiB")
    return measured
