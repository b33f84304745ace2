"""Writing files so that a reader never sees half of one: each file is written to a temporary name in its own folder
and renamed over the target (`os.replace`, atomic on one filesystem). A failure removes the temporary files and
leaves every target as it was."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


def write_files_atomic(files: dict[Path, str | bytes], *, fsync: bool = False) -> None:
    """Write every file of `files` (path -> content) to a temporary name first, then rename them all into place: a
    failure while writing leaves none of them changed. `fsync`: flush each file to disk before the rename (a crash
    right after cannot leave an empty file behind the new name)."""
    umask = os.umask(0)
    os.umask(umask)
    staged: list[tuple[str, Path]] = []
    try:
        for path, content in files.items():
            path = Path(path)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(content.encode() if isinstance(content, str) else content)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the result is an ordinary file
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def write_atomic(path: Path, content: str | bytes, *, fsync: bool = False) -> None:
    write_files_atomic({Path(path): content}, fsync=fsync)


def write_json_atomic(path: Path, data, *, indent: int | None = 2, fsync: bool = False) -> None:
    """`data` as JSON (values JSON does not know as their str()), ending in a newline."""
    write_atomic(path, json.dumps(data, indent=indent, default=str) + "\n", fsync=fsync)
