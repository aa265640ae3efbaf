"""Atomic writes: a reader sees the old file or the whole new one, never half of it.

The operating system's refusals (disk full, read-only file system, permission denied) are
user errors: `os_error` turns them into one line naming the path and the cause.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

from blues_train.io.errors import BluesError

_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give; mkstemp alone makes files private (0600)


def write_atomic(path: Path, data: bytes) -> None:
    """Temporary file beside `path`, fsync, rename, fsync the folder."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise os_error(exc, path) from None
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
        sync_dir(path.parent)
    except BaseException as exc:
        Path(temp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise os_error(exc, path) from None
        raise


def fresh_folder(parent: Path, prefix: str) -> Path:
    """A new, empty folder `PARENT/PREFIXxxxxxxxx` made by this call (mkdtemp: a unique name,
    never an existing folder or a symbolic link), with the permissions mkdir would give."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(folder, 0o777 & ~_UMASK)
    return folder


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def sync_dir(folder: Path) -> None:
    """Make renames in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def os_error(exc: OSError, path, action: str = "writing") -> BluesError:
    """`no space left on device while writing PATH`: the cause in words, then where."""
    reason = (exc.strerror or str(exc)).lower()
    advice = ADVICE.get(exc.errno, "")
    return BluesError(f"{reason} while {action} {path}{advice}")


ADVICE = {
    errno.ENOSPC: ": free some space or choose another folder, then run the same command again",
    errno.EDQUOT: ": free some space or choose another folder, then run the same command again",
    errno.EROFS: ": choose a folder on a writable file system",
    errno.EACCES: ": choose a folder you may write to, or fix its permissions",
    errno.EPERM: ": choose a folder you may write to, or fix its permissions",
}


def check_output_folder(folder, flag: str) -> None:
    """Before any work is done: the output `folder` (given as `flag`) can be made and
    written, so far as its nearest existing ancestor tells."""
    folder = Path(folder)
    blocking = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocking is None:
        return
    if not blocking.is_dir():
        raise BluesError(f"{flag} {folder}: {blocking} is a file, not a folder")
    if not os.access(blocking, os.W_OK):
        raise BluesError(f"{flag} {folder}: {folder_error(blocking) or f'{blocking} is not writable'}")


def folder_error(folder, action: str = "writing") -> BluesError | None:
    """Why writing under `folder` fails, when a library reports only that it failed
    (torch.save raises `RuntimeError: basic_ios::clear` on a full disk); None if no reason
    is visible."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        code = errno.EROFS
    elif not os.access(folder, os.W_OK):
        code = errno.EACCES
    elif stats.f_bavail * stats.f_frsize < FULL_BYTES:
        code = errno.ENOSPC
    else:
        return None
    return os_error(OSError(code, os.strerror(code)), folder, action)


FULL_BYTES = 1 << 20  # less than this left: the write failed for want of space
