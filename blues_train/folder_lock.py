"""One writer per folder: token stores, mixtures and training runs.

A writer holds an exclusive `flock` on the folder itself for as long as it writes. The kernel
releases it when the process ends, however it ends (SIGKILL included), so a dead run never
leaves a stale lock, and no lock file is added to the folder. A second writer fails at once,
naming the holder (found in /proc/locks on Linux). Readers take no lock: they trust only
what a manifest written last lists.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path

from blues_train.atomic import os_error
from blues_train.errors import BluesError


@contextmanager
def exclusive_writer(folder):
    """Hold `folder`'s writer lock for the block (creating the folder); BluesError if taken."""
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise os_error(exc, folder, "creating") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BluesError(f"{folder} is being written by {holder(os.fstat(fd))}: wait for it to "
                             "finish, stop it, or write somewhere else") from None
        try:
            yield
        finally:
            if created:  # a run that wrote nothing leaves no folder behind
                try:
                    folder.rmdir()
                except OSError:
                    pass  # not empty: it holds what the run wrote
    finally:
        os.close(fd)


def holder(stat: os.stat_result) -> str:
    """`pid N (started ..., COMMAND)` of the process holding a flock on the folder `stat`."""
    device = (os.major(stat.st_dev), os.minor(stat.st_dev), stat.st_ino)
    try:
        with open("/proc/locks") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[3] == "WRITE":
                    major, minor, inode = fields[5].split(":")
                    if (int(major, 16), int(minor, 16), int(inode)) == device:
                        return describe(int(fields[4]))
    except (OSError, ValueError):
        pass
    return "another process"


def describe(pid: int) -> str:
    """`pid N (started 2026-12-01 22:40:05, blues prepare ...)`, as much as /proc tells."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22: start, in ticks after boot
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(boot + ticks / os.sysconf("SC_CLK_TCK")))
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            command = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (OSError, ValueError, IndexError, StopIteration):
        return f"pid {pid}"
    return f"pid {pid} (started {started}, {command[:200]})"
