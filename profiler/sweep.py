"""Sweeps: a matrix of profiles, each in a fresh subprocess, appended as records to a results file.

A sweep file (YAML) names configurations by the setup flags of `vlplan profile` (their option names, `seq_len` or
`seq-len`) plus `steps`, `weights`, `memory_limit_gib` and `timeout_s`:

    defaults: {steps: 3, image_max_pixels: 2000000}   # under every configuration
    configs:                                          # one configuration each
      - {model: qwen2.5-vl-7b, method: lora, seq_len: 2048, images: 1, image_size: 768x768}
    matrix:                                           # optional: cartesian products
      - {model: [qwen2-vl-2b], method: [lora, full], batch_size: [1, 4]}

Every configuration is resolved (`planner.resolve.resolve_setup`, what every command uses) before anything runs, so
a bad one is a one-line error naming it. Each then runs `python -m vlplan.profiler.sweep JOB RECORD` in a new process (its own
session: a timeout kills the whole group), so an out-of-memory error, a crash or a hang ends that configuration
only: the worker writes its record (oom=true after an OOM), and the parent writes one with `error` for a worker
that died without one. Records are appended one by one as they finish (`append_records`: read, append, write a
temporary file, fsync, rename, under a lock on the directory); a results file that is not a JSON list is an error,
never overwritten. Configurations already measured in the results file (same settings, steps, backend, device and
versions; out of memory counts as measured, an error does not) are skipped unless `rerun`, so a sweep split over
several sessions (or killed) continues where it stopped.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import itertools
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from vlplan.planner.errors import VlplanError
from vlplan.planner.io.files import write_json_atomic
from vlplan.planner.units import GIB

PROFILE_KEYS = ("steps", "weights", "memory_limit_gib", "timeout_s")
DEFAULT_TIMEOUT_S = 600.0
STDERR_TAIL_LINES = 15
RESULTS_DIR = Path("benchmarks") / "results"


@dataclass
class SweepConfig:
    index: int
    raw: dict  # the configuration as written, over the defaults
    setup: object  # TrainSetup
    options: object  # ProfileOptions
    timeout_s: float
    warnings: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return config_label(self.setup)


def config_label(setup) -> str:
    return config_label_of({"config": setup.describe()})


def config_label_of(record: dict) -> str:
    """`config_label` of a record's resolved settings (TrainSetup.describe())."""
    c = record.get("config") or {}
    images = c.get("images") or []
    parts = [str(c.get("model")), str(c.get("method"))]
    if c.get("vision") not in (None, "frozen"):
        parts.append(f"vision {c['vision']}")
    parts += [f"seq {c.get('seq_len')}", f"batch {c.get('batch_size')}",
              f"{len(images)} x {images[0]}" if images else "no image",
              f"ckpt {'on' if c.get('gradient_checkpointing') else 'off'}"]
    limit = (record.get("sweep_config") or {}).get("memory_limit_gib")
    if limit:
        parts.append(f"limit {limit} GiB")
    return ", ".join(parts)


# The sweep file -----------------------------------------------------------------------------------------------------
def load_sweep(path: str | Path, *, backend: str = "cuda", timeout_s: float = DEFAULT_TIMEOUT_S) -> list[SweepConfig]:
    """The resolved configurations of a sweep file (see the module docstring); VlplanError names a bad one."""
    import yaml

    from vlplan.planner.resolve import SETUP_DEFAULTS

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise VlplanError(f"--sweep {path}: no such file") from None
    except yaml.YAMLError as err:
        raise VlplanError(f"--sweep {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict) or not ({"configs", "matrix"} & set(data)):
        raise VlplanError(f"--sweep {path}: expected a mapping with configs: (a list) and/or matrix: (a list of "
                          "{key: [values]}), and optionally defaults:")
    unknown_top = set(data) - {"name", "description", "defaults", "configs", "matrix"}
    if unknown_top:
        raise VlplanError(f"--sweep {path}: unknown top-level key(s) {', '.join(sorted(unknown_top))}; use name, "
                          "description, defaults, configs, matrix")
    allowed = set(SETUP_DEFAULTS) | set(PROFILE_KEYS)
    defaults = _normalized(data.get("defaults") or {}, allowed, path, "defaults")
    raws = []
    for i, entry in enumerate(_list(data.get("configs"), path, "configs")):
        raws.append({**defaults, **_normalized(entry, allowed, path, f"configs[{i}]")})
    for i, block in enumerate(_list(data.get("matrix"), path, "matrix")):
        block = _normalized(block, allowed, path, f"matrix[{i}]")
        keys = list(block)
        values = [v if isinstance(v, list) else [v] for v in block.values()]
        for combination in itertools.product(*values):
            raws.append({**defaults, **dict(zip(keys, combination))})
    if not raws:
        raise VlplanError(f"--sweep {path} holds no configuration")
    return [_resolve(i, raw, path, backend, timeout_s) for i, raw in enumerate(raws)]


def _list(value, path, key) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise VlplanError(f"--sweep {path}: {key} must be a list")
    return value


def _normalized(entry, allowed: set[str], path, where: str) -> dict:
    if not isinstance(entry, dict):
        raise VlplanError(f"--sweep {path}: {where} must be a mapping of option names to values")
    out = {}
    for key, value in entry.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in allowed:
            close = difflib.get_close_matches(name, sorted(allowed), n=1)
            raise VlplanError(f"--sweep {path}: {where} has unknown key {key!r}"
                              + (f"; did you mean {close[0]}?" if close else "; use `vlplan profile` option names"))
        out[name] = value
    return out


def _resolve(index: int, raw: dict, path, backend: str, timeout_s: float) -> SweepConfig:
    from vlplan.planner.resolve import resolve_setup

    from .profile import ProfileOptions, check_profilable

    options = {k: v for k, v in raw.items() if k not in PROFILE_KEYS}
    if isinstance(options.get("image_size"), str):
        options["image_size"] = [options["image_size"]]
    for key in ("from_llamafactory", "deepspeed", "dataset", "dataset_dir", "media_dir", "dataset_info",
                "tokenizer"):
        if options.get(key) is not None:
            options[key] = Path(options[key])
    where = f"--sweep {path} configuration #{index + 1} ({', '.join(f'{k}={v}' for k, v in raw.items())})"
    try:
        resolved = resolve_setup(**options)
        limit = raw.get("memory_limit_gib")
        profile_options = ProfileOptions(steps=int(raw.get("steps", 3)), backend=backend,
                                         weights=str(Path(raw["weights"]).expanduser().resolve())
                                         if raw.get("weights") else None,
                                         memory_limit_bytes=int(float(limit) * GIB) if limit else None)
        check_profilable(resolved.setup, profile_options)
        timeout = float(raw.get("timeout_s", timeout_s))
        if timeout <= 0:
            raise VlplanError(f"timeout_s must be positive, got {timeout:g}")
    except (VlplanError, TypeError, ValueError) as err:
        raise VlplanError(f"{where}: {err}") from None
    return SweepConfig(index, raw, resolved.setup, profile_options, timeout, resolved.warnings)


# Results files ------------------------------------------------------------------------------------------------------
def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def default_results_path(device: str, backend: str, directory: Path = RESULTS_DIR) -> Path:
    """benchmarks/results/gpu-<device>-<date>.json (cpu-<device>-<date>.json for the cpu backend), date in UTC."""
    prefix = "gpu" if backend == "cuda" else "cpu"
    return Path(directory) / f"{prefix}-{device_slug(device)}-{time.strftime('%Y-%m-%d', time.gmtime())}.json"


def read_records(path: Path) -> list[dict]:
    """The records of a results file ([] when it does not exist). A file that is not a JSON list of objects is an
    error that says what to do; it is left untouched."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise VlplanError(f"results file {path} is not valid JSON ({err.msg} at line {err.lineno}); it is left as "
                          "it is: repair it or move it aside, or pass --output for a new file") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise VlplanError(f"results file {path} is not a JSON list of records; it is left as it is: move it aside "
                          "or pass --output for a new file")
    return data


@contextlib.contextmanager
def _directory_lock(directory: Path):
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def append_records(path: Path, records: list[dict]) -> int:
    """Append `records` to the results file without ever losing the ones there: under a lock on the directory, read
    them (a corrupt file is an error, untouched), write all to a temporary file in the same directory, fsync, and
    rename it over the file. Returns the number of records now in the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _directory_lock(path.parent):
        existing = read_records(path)
        combined = existing + list(records)
        write_json_atomic(path, combined, indent=1, fsync=True)
        with contextlib.suppress(OSError):
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    return len(combined)


def record_key(record: dict) -> str:
    """What makes two records measure the same thing."""
    return json.dumps([record.get("config"), record.get("steps"), record.get("backend"), record.get("device"),
                       record.get("torch"), record.get("transformers")], sort_keys=True, default=str)


# Running ------------------------------------------------------------------------------------------------------------
def installed_versions() -> dict:
    """torch and transformers versions without importing them (the parent of a sweep stays light)."""
    found = {}
    for name in ("torch", "transformers"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def sweep_device(backend: str) -> str:
    """The device a sweep runs on, named without creating a CUDA context in this (the parent) process."""
    if backend == "cpu":
        return "cpu"
    import torch

    from .gpu import NO_CUDA, NoCudaError, nvml_device

    if not torch.cuda.is_available():
        raise NoCudaError(NO_CUDA)
    info = nvml_device()
    if info is None:
        raise VlplanError("vlplan profile reads device memory with NVML and found none: pip install nvidia-ml-py "
                          "(the 'gpu' extra)")
    return info["name"]


def failure_record(config: SweepConfig, device: str, error: str, returncode: int | None, stderr: str) -> dict:
    """The record of a configuration whose worker died without writing one (a crash, a kill, a timeout)."""
    from vlplan.planner.memory.estimate import estimate

    try:
        expected = estimate(config.setup)
    except VlplanError:
        expected = None
    versions = installed_versions()
    return {
        "config": config.setup.describe(), "device": device, "backend": config.options.backend,
        "torch": versions["torch"], "transformers": versions["transformers"],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "estimate_peak_bytes": expected.peak_bytes if expected else None, "measured_peak_bytes": None,
        "estimate_allocated_peak_bytes": expected.allocated_peak_bytes if expected else None,
        "measured_allocated_peak_bytes": None, "oom": False, "error": error, "step_time_s": None,
        "capacity_bytes": config.options.memory_limit_bytes,
        "returncode": returncode, "stderr_tail": stderr, "steps": config.options.steps,
    }


def run_isolated(config: SweepConfig, device: str, workdir: Path) -> dict:
    """Profile one configuration in a new Python process; its record (the worker's, or a failure record)."""
    workdir.mkdir(parents=True, exist_ok=True)
    job, out = workdir / "job.pkl", workdir / "record.json"
    with job.open("wb") as f:
        pickle.dump({"setup": config.setup, "options": config.options}, f)
    command = [sys.executable, "-m", "vlplan.profiler.sweep", str(job), str(out)]
    # its own session, so a timeout kills whatever it started too; the working directory is the job's, so a
    # `vlplan` folder in the caller's directory (a source checkout) cannot shadow the installed package
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, cwd=workdir)
    error = None
    try:
        _, stderr = process.communicate(timeout=config.timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        _, stderr = process.communicate()
        error = f"timed out after {config.timeout_s:g} s (killed)"
    except BaseException:  # interrupted (SIGINT, SIGTERM): the worker must not outlive the sweep on the GPU
        _kill_group(process)
        process.wait()
        raise
    tail = "\n".join(stderr.strip().splitlines()[-STDERR_TAIL_LINES:])
    if error is None and out.is_file():
        record = json.loads(out.read_text())
        record["returncode"] = process.returncode
        return record
    if error is None:
        code = process.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        last = tail.splitlines()[-1] if tail else "no output"
        error = f"the profile process {how} without a record: {last}"
    return failure_record(config, device, error, process.returncode, tail)


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def terminate_as_exit():
    """SIGTERM (a `timeout`, a scheduler) ends the sweep like Ctrl-C does: through the clean-up that kills the
    running worker, keeping every record appended so far."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class SweepSummary:
    path: Path
    ran: int = 0
    skipped: int = 0
    ooms: int = 0
    errors: int = 0
    records: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"results": str(self.path), "ran": self.ran, "skipped": self.skipped, "ooms": self.ooms,
                "errors": self.errors, "records": self.records}


def run_sweep(configs: list[SweepConfig], *, backend: str, output: Path | None = None, rerun: bool = False,
              on_event=lambda kind, data: None) -> SweepSummary:
    """Run every configuration in its own process and append each record as it finishes (module docstring).
    Events: ("start", {path, total, skipped}), ("config", {index, label}), ("record", record)."""
    device = sweep_device(backend)
    path = Path(output) if output else default_results_path(device, backend)
    versions = installed_versions()
    done = set() if rerun else {record_key(r) for r in read_records(path) if not r.get("error")}
    summary = SweepSummary(path)
    todo = []
    for config in configs:
        probe = {"config": config.setup.describe(), "steps": config.options.steps, "backend": backend,
                 "device": device, **versions}
        if record_key(probe) in done:
            summary.skipped += 1
        else:
            todo.append(config)
    on_event("start", {"path": str(path), "total": len(todo), "skipped": summary.skipped})
    with tempfile.TemporaryDirectory(prefix="vlplan-sweep-") as tmp, terminate_as_exit():
        for config in todo:
            on_event("config", {"index": config.index, "label": config.label})
            record = run_isolated(config, device, Path(tmp) / f"config-{config.index}")
            record["sweep_config"] = config.raw
            append_records(path, [record])
            summary.ran += 1
            summary.ooms += bool(record.get("oom"))
            summary.errors += bool(record.get("error"))
            summary.records.append(record)
            on_event("record", record)
    return summary


# The worker ---------------------------------------------------------------------------------------------------------
def worker_main(argv: list[str]) -> int:
    """`python -m vlplan.profiler.sweep JOB RECORD`: profile the pickled (setup, options) and write its record.
    Exit codes: 0 measured, 3 out of memory (a record with oom=true), 2 bad input (a record with the error)."""
    import warnings

    from vlplan.planner.oom import OOM_EXIT_CODE

    from .profile import profile

    job_path, out_path = Path(argv[0]), Path(argv[1])
    with job_path.open("rb") as f:
        job = pickle.load(f)  # written by run_isolated of the same installation
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        result = profile(job["setup"], job["options"])
    except VlplanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    record = result.to_record()
    write_json_atomic(out_path, record, indent=None)
    return OOM_EXIT_CODE if result.oom else 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
