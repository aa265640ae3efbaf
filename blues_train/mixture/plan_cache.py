"""The loader's derived tables, built once per machine and memory-mapped by every reader.

A mixture's per-split document table and each pass plan (blues_train/mixture/loader.py) depend only
on the mixture (its fingerprint), the loader seed, the split and the pass number, never on
seq_len, rank or world size. They are written as NumPy `.npy` files in one folder per
mixture fingerprint and format version:

    <index_cache_dir or MIXTURE/.blues-index>/v2-<fingerprint[:32]>/documents-train.npy
                                                                 /plan-train-seed0-pass0.npy

and opened with `np.load(mmap_mode="r")`, so ranks and DataLoader workers of one machine
share one copy in the page cache and private memory does not grow with documents. A table
is built under an exclusive lock on its own lock file (`.NAME.lock`), so ranks that start
together build it once: the others wait, then map what the first wrote. Files are written
to a temporary name, synced and renamed (a reader sees a whole file or none); a file that does
not parse, or fails its caller's check (its length, the tokens it covers), is built again. The
large tables are built in place, in the temporary file mapped writable, its blocks reserved
first (posix_fallocate: a full disk is an error there, not SIGBUS on a page written later), so
a build neither holds them in private memory nor copies them into the page cache.

The loader of a multi-rank run also keeps here each chunk's tokens, decompressed once per
machine (`tokens-<chunk sha256>.npy`, see loader.ChunkCache).

Pass plans and token files are pruned: each `get` marks its file used (its mtime), and the
loader keeps on disk only the few most recently used of each kind (`keep_recent`); an older
one is deleted under its lock (skipped while another process holds it) and, if a lineage
query or a resume wants it again, rebuilt identically. A process that mapped a deleted file
keeps reading it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Callable

import numpy as np

from blues_train.io import storage
from blues_train.io.atomic import os_error, sync_dir
from blues_train.io.errors import BluesError
from blues_train.io.npy_header import saved_header

FORMAT_VERSION = 2
FOLDER = ".blues-index"
Build = Callable[[Callable[..., np.ndarray]], np.ndarray]
reserve = getattr(os, "posix_fallocate", None)  # absent on macOS: tables are built in memory, then written


def in_memory(shape: tuple, dtype=np.int64) -> np.ndarray:
    """An F-ordered array in private memory: `allocate` where no file is written."""
    return np.empty(shape, dtype=dtype, order="F")


def cache_folder(mixture_dir, fingerprint: str, index_cache_dir=None) -> Path:
    """Where a mixture's tables live: under `index_cache_dir`, else beside a local mixture,
    else (a mixture on object storage) under the local cache root."""
    if index_cache_dir is not None:
        base = Path(index_cache_dir)
    elif storage.is_remote(mixture_dir):
        base = storage.cache_root() / "index"
    else:
        base = Path(mixture_dir) / FOLDER
    return base / f"v{FORMAT_VERSION}-{fingerprint[:32]}"


class PlanCache:
    """Named arrays in one folder: `get` maps a valid one, or builds, writes and maps it."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def get(self, name: str, build: Build, valid: Callable[[np.ndarray], bool]) -> np.ndarray:
        """Array `name`: mapped from the folder when present and `valid`, else `build(allocate)`
        (once across processes sharing the folder), written, and mapped. `build` returns the
        array to write: one it computed, or the one `allocate(shape, dtype)` gave it to fill, an
        F-ordered array mapped on the file being written (a large table is written in place,
        never copied through private memory)."""
        found = self._load(name, valid)
        if found is not None:
            self._mark_used(name)
            return found
        with self._lock(name):
            found = self._load(name, valid)  # another process may have built it meanwhile
            if found is None:
                self._save(name, build)
                found = self._load(name, valid)
        if found is None:
            raise BluesError(f"{self.folder / name}: written but unreadable; check the disk, or give "
                             "another --index_cache_dir")
        return found

    def open(self, name: str, dtype, shape: tuple) -> tuple[int, int] | None:
        """(open read-only fd, data offset) of file `name` when it holds exactly an array of
        `dtype` and `shape` as `np.save` writes one, else None: for readers that pread a few
        pages of many files (opening is about 10x cheaper than `get`'s mapping). The caller
        closes the fd."""
        expected = saved_header(dtype, shape)
        try:
            fd = os.open(self.folder / name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            size = len(expected) + int(np.prod(shape)) * np.dtype(dtype).itemsize
            if os.pread(fd, len(expected), 0) == expected and os.fstat(fd).st_size == size:
                self._mark_used(name)
                return fd, len(expected)
        except OSError:
            pass
        os.close(fd)
        return None

    def has(self, name: str) -> bool:
        """Whether the folder holds a file `name` (readable or not)."""
        return (self.folder / name).exists()

    def keep_recent(self, pattern: str, keep: int) -> None:
        """Delete all but the `keep` most recently used files of the folder matching `pattern`
        (a glob of names this cache writes), each with its lock file, unless locked elsewhere."""
        def last_used(path: Path) -> int:
            try:
                return path.stat().st_mtime_ns
            except FileNotFoundError:
                return -1

        for path in sorted(self.folder.glob(pattern), key=last_used, reverse=True)[keep:]:
            lock = FileLock(self.folder / f".{path.name}.lock")
            if lock.try_acquire():
                try:
                    path.unlink(missing_ok=True)
                    lock.path.unlink(missing_ok=True)
                finally:
                    lock.release()

    def _mark_used(self, name: str) -> None:
        try:
            os.utime(self.folder / name)
        except OSError:
            pass  # a read-only cache is still read; only its pruning order is older

    def _load(self, name: str, valid) -> np.ndarray | None:
        path = self.folder / name
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            return None
        except (ValueError, OSError, EOFError):
            return None  # truncated or damaged: built again
        return np.asarray(array) if valid(array) else None  # a plain view: memmap's slicing costs microseconds

    def _save(self, name: str, build: Build) -> None:
        path = self.folder / name
        temp = self.folder / f".{name}.{os.getpid()}.tmp"
        mapped: list[np.ndarray] = []

        def allocate(shape: tuple, dtype=np.int64) -> np.ndarray:
            if reserve is None or not np.prod(shape):
                return in_memory(shape, dtype)
            array = np.lib.format.open_memmap(temp, mode="w+", dtype=dtype, shape=shape, fortran_order=True)
            with open(temp, "r+b") as fh:  # a full disk fails here, not as SIGBUS on a page written later
                reserve(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
            mapped.append(array)
            return array

        try:
            array = build(allocate)
            if mapped and array is mapped[0]:
                array.flush()
                with open(temp, "r+b") as fh:
                    os.fsync(fh.fileno())
            else:
                with open(temp, "wb") as fh:
                    np.save(fh, array, allow_pickle=False)
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(temp, path)
            sync_dir(self.folder)
        except OSError as exc:
            raise os_error(exc, path, "writing the loader's index cache (--index_cache_dir)") from None
        finally:
            temp.unlink(missing_ok=True)

    def _lock(self, name: str):
        return FileLock(self.folder / f".{name}.lock")


class FileLock:
    """An exclusive flock on a lock file, waited for (the kernel drops it if the holder dies)."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def __enter__(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise os_error(exc, self.path.parent, "creating the loader's index cache (--index_cache_dir)") from None
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.release()

    def try_acquire(self) -> bool:
        """Take the lock if it is free now (False: held elsewhere, or the folder unwritable)."""
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return False
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            return False
        return True

    def release(self) -> None:
        os.close(self.fd)
        self.fd = None
