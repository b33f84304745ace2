"""A persistent cache of computed results (simulations of the training step, table rows), so that a repeated table or
plan is read back instead of recomputed.

Where: `$VLPLAN_CACHE_DIR`, else `$XDG_CACHE_HOME/vlplan`, else `~/.cache/vlplan`; `VLPLAN_NO_CACHE=1` turns it off.
What: one JSON file per entry, named by a hash of its key (the result's complete inputs, as `repr`) and stored under a
hash of the planner's and the tables' source (`source_hash`): any change to the code that computes a result makes
every older entry unreachable (old folders can be deleted at will). Each file also holds the key's repr, compared on
load, so two keys whose hashes collided would not be confused.
Safety: an entry is written to a temporary file in its folder and renamed over its name (`os.replace`, atomic on
POSIX and Windows), so concurrent writers (table worker processes, two `vlplan` runs) leave either entry whole;
an unreadable or malformed entry (a disk full mid-write, a truncated copy) reads as absent and is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

ENV_DIR = "VLPLAN_CACHE_DIR"
ENV_OFF = "VLPLAN_NO_CACHE"
_ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("planner", "tables")  # the code a cached result depends on (the CLI only renders)


def cache_dir() -> Path | None:
    """The cache folder, or None when caching is off."""
    if os.environ.get(ENV_OFF, "") not in ("", "0"):
        return None
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vlplan"


@lru_cache(maxsize=1)
def source_hash() -> str:
    """A hash of every Python file of the planner and the tables (path and bytes)."""
    digest = hashlib.sha256()
    for folder in SOURCE_FOLDERS:
        for path in sorted((_ROOT / folder).rglob("*.py")):
            digest.update(str(path.relative_to(_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _path(folder: Path, namespace: str, key_repr: str) -> Path:
    name = hashlib.sha256(key_repr.encode()).hexdigest()
    return folder / namespace / source_hash() / name[:2] / f"{name[2:]}.json"


def load(namespace: str, key) -> object | None:
    """The value stored under `key`, or None (absent, caching off, or an unreadable entry)."""
    folder = cache_dir()
    if folder is None:
        return None
    key_repr = repr(key)
    try:
        with open(_path(folder, namespace, key_repr), encoding="utf-8") as f:
            entry = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != key_repr or "value" not in entry:
        return None
    return entry["value"]


def store(namespace: str, key, value) -> None:
    """Store a JSON-ready `value` under `key` (atomically; a folder that cannot be written is skipped silently: the
    cache only saves time)."""
    folder = cache_dir()
    if folder is None:
        return
    key_repr = repr(key)
    path = _path(folder, namespace, key_repr)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"key": key_repr, "value": value}, f, separators=(",", ":"))
            os.replace(temporary, path)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
    except OSError:
        return
