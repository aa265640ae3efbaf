"""One writer per folder: token stores, mixtures and training runs.

A writer holds an exclusive `flock` on the folder itself for as long as it writes. The kernel
releases it when the process ends, however it ends (SIGKILL included), so a dead run never
leaves a stale lock, and no lock file is added to the folder. A second writer fails at once,
naming the holder (found in /proc/locks on Linux). Readers take no lock: they trust only
what a manifest written last lists.

On object storage (an `s3://` folder) the lock is a *lease*: the object `FOLDER/.blues-writer.json`
(owner, host, pid, expiry), created with a conditional PUT (`If-None-Match: *`) that only one
writer can win, renewed by a background thread every LEASE_SECONDS / 4 (`If-Match` on its
ETag, so a writer whose lease was taken over notices), deleted when the writer is done. A lease
past its expiry, or one held by a process of this host that is gone (a SIGKILLed run), is
taken over with `If-Match` on the stale lease's ETag, which again only one writer wins.
Before writing a commit object (manifest.json, mixture.json, meta.json) a writer checks
that its lease still stands (`check_held`); before the first byte of a checkpoint upload
and again before its commit, training renews it on the spot (`renew_held`), so a writer
whose lease was taken over learns it from the store, not from the next background renewal.

What S3 cannot promise: no lock is released by the death of its holder (the expiry does that,
so a writer killed on another host blocks the folder for up to LEASE_SECONDS); checking the
lease and writing the commit object are two requests, so a writer paused for longer than
the lease (swapped out, a stopped VM) could still commit after another took over; the expiry
is judged by the reader's clock. A store that ignores conditional headers makes the PUTs
plain: the lease is read back after writing and a writer that finds another's token there
stops, which narrows the window but cannot close it. AWS S3 has honoured both headers since
2024; MinIO, Ceph RGW and moto do too.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from blues_train.io import storage
from blues_train.io.atomic import os_error
from blues_train.io.errors import BluesError

LEASE_FILE = ".blues-writer.json"
LEASE_SECONDS = float(os.environ.get("BLUES_LEASE_SECONDS", "120"))
_HELD: dict[str, "Lease"] = {}  # remote folder -> this process's lease on it


@contextmanager
def exclusive_writer(folder):
    """Hold `folder`'s writer lock for the block (creating the folder); BluesError if taken."""
    if storage.is_remote(folder):
        with object_lease(storage.path(folder)):
            yield
        return
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


def process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks after boot (None: no such process)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@contextmanager
def object_lease(folder):
    """Hold the writer lease of the remote `folder` for the block; BluesError if another holds it."""
    lease = Lease(folder)
    lease.acquire()
    _HELD[str(folder)] = lease
    try:
        yield lease
    finally:
        _HELD.pop(str(folder), None)
        lease.release()


def check_held(folder) -> None:
    """Before a commit object is written to `folder`: this process's lease on it still stands
    (a no-op for local folders, whose flock cannot be lost)."""
    lease = _HELD.get(str(storage.path(folder)))
    if lease is not None:
        lease.check()


def renew_held(folder) -> None:
    """Renew this process's lease on `folder` now; BluesError if another writer took it over
    (a no-op for local folders)."""
    lease = _HELD.get(str(storage.path(folder)))
    if lease is not None:
        lease.renew()
        lease.check()


class Lease:
    """The writer lease object of one remote folder (see the module's docstring)."""

    def __init__(self, folder):
        self.folder, self.object = folder, folder / LEASE_FILE
        self.token, self.etag, self.lost = uuid.uuid4().hex, None, None
        self.stop = threading.Event()
        self.thread = None
        self.renewing = threading.Lock()  # one conditional PUT at a time: each needs the last ETag

    def body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": describe(os.getpid()), "host": socket.gethostname(), "pid": os.getpid(),
                           "process_start": process_start(os.getpid()), "token": self.token,
                           "renewed": now, "expires": now + LEASE_SECONDS}).encode()

    def acquire(self) -> None:
        try:
            self.etag = storage.put_if_absent(self.object, self.body())
        except storage.PreconditionFailed:
            self.take_over()
        current, _ = self.read()
        if current.get("token") != self.token:
            raise BluesError(f"{self.folder} is being written by {current.get('owner', 'another writer')} "
                             f"(lease {self.object}): wait for it to finish, stop it, or write somewhere else")
        self.thread = threading.Thread(target=self.renew_loop, name="blues-lease", daemon=True)
        self.thread.start()

    def read(self) -> tuple[dict, str]:
        data, etag = storage.read_with_etag(self.object)
        try:
            found = json.loads(data)
        except ValueError:
            found = {}
        return (found if isinstance(found, dict) else {}), etag

    def take_over(self) -> None:
        """Replace a stale lease (only the one version read: If-Match); BluesError if it is live."""
        try:
            current, etag = self.read()
        except FileNotFoundError:  # released meanwhile
            self.etag = storage.put_if_absent(self.object, self.body())
            return
        why = stale(current)
        if why is None:
            expires = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(current.get("expires", 0)))
            raise BluesError(f"{self.folder} is being written by {current.get('owner', 'another writer')} "
                             f"(lease {self.object}, expires {expires} unless renewed): wait for it to "
                             "finish, stop it, or write somewhere else")
        try:
            self.etag = storage.put_if_match(self.object, self.body(), etag)
        except storage.PreconditionFailed:
            raise BluesError(f"{self.folder}: another writer took over its stale lease {self.object} "
                             "at the same moment; write somewhere else or try again") from None

    def renew(self) -> None:
        """Extend the lease (If-Match on its ETag); a lease taken over is `lost` for good."""
        with self.renewing:
            if self.lost:
                return
            try:
                self.etag = storage.put_if_match(self.object, self.body(), self.etag)
            except storage.PreconditionFailed:
                self.lost = f"another writer took over the lease {self.object}"

    def renew_loop(self) -> None:
        while not self.stop.wait(LEASE_SECONDS / 4):
            try:
                self.renew()
                if self.lost:
                    return
            except Exception as exc:  # the store unreachable: try again until the lease runs out
                self.lost_since = getattr(self, "lost_since", time.time())
                if time.time() - self.lost_since > LEASE_SECONDS:
                    self.lost = f"the lease {self.object} could not be renewed ({exc})"
                    return
            else:
                self.lost_since = time.time()

    def check(self) -> None:
        if self.lost:
            raise BluesError(f"{self.folder}: {self.lost}; nothing was committed: run the command again "
                             "once the other writer is done")

    def release(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        if self.etag and not self.lost:
            try:
                storage.delete_if_match(self.object, self.etag)
            except BluesError:
                pass  # it expires by itself


def stale(lease: dict) -> str | None:
    """Why a lease no longer binds (expired, or its process on this host is gone), or None."""
    if not lease or time.time() > float(lease.get("expires", 0)):
        return "expired"
    if lease.get("host") == socket.gethostname():
        pid = lease.get("pid")
        if isinstance(pid, int) and process_start(pid) != lease.get("process_start"):
            return f"its process {pid} has ended"
    return None
