"""Files that vlplan writes (exports, tables, profiles, run records, tiny models), written safely.

Atomic: each file is written to a temporary name in its own folder and renamed over the target (`os.replace`,
atomic on one filesystem), so a reader never sees half of one; a failure removes the temporary files and leaves
every target as it was.

Checked first: a path that cannot be written is refused before any work, with one line that names the flag and the
reason (a folder where a file goes, a file where a folder goes, a read-only folder), and a write that fails anyway (a
full disk, a read-only filesystem seen only by root) becomes the same one-line error with whatever it created
removed (`writing`): a failed command leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import VlplanError


def write_files_atomic(files: dict[Path, str | bytes], *, fsync: bool = False) -> None:
    """Write every file of `files` (path -> content) to a temporary name first, then rename them all into place: a
    failure while writing leaves none of them changed. `fsync`: flush each file to disk before the rename (a crash
    right after cannot leave an empty file behind the new name). An OSError names the target it was writing."""
    umask = os.umask(0)
    os.umask(umask)
    staged: list[tuple[str, Path]] = []
    try:
        for path, content in files.items():
            path = Path(path)
            try:
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                staged.append((tmp, path))
                with os.fdopen(fd, "wb") as f:
                    f.write(content.encode() if isinstance(content, str) else content)
                    if fsync:
                        f.flush()
                        os.fsync(f.fileno())
                os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the result is an ordinary file
            except OSError as err:
                raise type(err)(err.errno, err.strerror or str(err), str(path)) from err
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


# Output paths, checked before any work ------------------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _probe(folder: Path, path: Path, flag: str) -> None:
    """Create `folder` (and its missing parents) and a file in it, then remove them again: whether the command will
    be able to write there, asked of the filesystem itself (permission bits do not stop root; a read-only mount
    does)."""
    created: list[Path] = []
    try:
        for parent in reversed([folder, *folder.parents]):
            if not parent.exists():
                parent.mkdir()
                created.append(parent)
        descriptor, probe = tempfile.mkstemp(dir=folder, prefix=".vlplan-probe-")
        os.close(descriptor)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or str(err)
        raise VlplanError(f"{flag} {path}: cannot write in {err.filename or folder} ({reason}); choose another "
                          "path") from None
    finally:
        for parent in reversed(created):
            try:
                parent.rmdir()
            except OSError:
                pass


def _check_parents(path: Path, flag: str) -> None:
    """The nearest existing ancestor of `path` must be a folder, and `path`'s folder writable."""
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise VlplanError(f"{flag} {path}: {existing} is a file, not a folder; choose another path")
    _probe(path.parent, path, flag)


def check_output_file(path: Path, flag: str) -> None:
    """`path` can be created or replaced as a file."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise VlplanError(f"{flag} {path} is a folder; give a file name")
    _check_parents(path, flag)


def check_output_dir(path: Path, flag: str) -> None:
    """`path` is a folder we may write into, or can be created as one."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise VlplanError(f"{flag} {path} is a file, not a folder; choose another path")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise VlplanError(f"{flag} {path}: {existing} is a file, not a folder; choose another path")
    _probe(path, path, flag)


class writing:
    """Write inside `with writing(paths, flag):`. An OSError becomes `VlplanError` naming the flag, and every path of
    `paths` (files or folders, with the missing folders above them) that did not exist before is removed; on any
    other error the created paths are removed too and the error goes on."""

    def __init__(self, paths: list[Path], flag: str):
        self.flag = flag
        self.created: list[Path] = []
        for path in (Path(p).expanduser() for p in paths):
            missing = [p for p in (path, *path.parents) if not p.exists() and not p.is_symlink()]
            self.created += [p for p in missing if p not in self.created]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return False
        for path in self.created:  # deepest first: a path comes before its parents
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
            except OSError:
                pass
        if issubclass(exc_type, OSError) and not issubclass(exc_type, (KeyboardInterrupt,)):
            reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "") or str(exc)
            where = f" ({exc.filename})" if exc.filename else ""
            raise VlplanError(f"{self.flag}: cannot write{where}: {reason}") from None
        return False
