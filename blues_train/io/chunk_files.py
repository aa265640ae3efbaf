"""Local copies of remote chunks: a bounded LRU folder, filled ahead on background threads.

Training reads a mixture on object storage through this cache, so that in steady state a
step never waits on the network: the loader asks for the chunks of the next block of
windows (`prefetch`) while it packs the current one from chunks already here.

- Content-addressed: a chunk is stored as `FOLDER/<sha256>.arrow`, the sha256 its committed
  manifest lists, and only after the downloaded bytes hashed to it. A chunk that does not is
  an error naming the object (it changed or was corrupted after the store was committed).
  The same chunk is therefore shared by every mixture, rank and run on the host that use it,
  and a file here never needs to be checked again.
- Bounded: after each download the least recently used files beyond `max_bytes` are deleted
  (a file in use stays readable: it is memory-mapped, and its pages stay until unmapped),
  except the one `local` handed out last, which its caller is about to open: a prefetch
  finishing in between must not delete it. (Processes sharing the folder do not see each
  other's: give each rank's host enough cache for the chunks in flight.)
- Concurrent: downloads go to a temporary name and are renamed into place, so processes
  sharing the folder (ranks on one host) see a whole chunk or none.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from blues_train.io import storage
from blues_train.io.errors import BluesError

DEFAULT_CACHE_GB = 16.0
PREFETCH_THREADS = 4


def default_folder() -> Path:
    return storage.cache_root() / "chunks"


class ChunkFiles:
    """Remote chunk objects -> local files, LRU-bounded to `max_bytes` on disk."""

    def __init__(self, folder=None, max_bytes: int | None = None, threads: int = PREFETCH_THREADS):
        self.folder = Path(folder) if folder else default_folder()
        self.max_bytes = int(max_bytes if max_bytes is not None else DEFAULT_CACHE_GB * 2**30)
        self.threads = threads
        self.pool: ThreadPoolExecutor | None = None
        self.pool_pid = None
        self.pending: dict[str, Future] = {}
        self.lock = threading.Lock()
        self.downloads = 0  # chunks fetched from the store by this object (for tests and benchmarks)
        self.handed_out: Path | None = None  # the last file `local` returned, kept by `evict`

    def local(self, remote, sha256: str, size: int) -> Path:
        """The local copy of chunk `remote` (fetched now if it is not here yet)."""
        self.handed_out = self.file_of(remote, sha256)
        return self._submit(remote, sha256, size).result()

    def file_of(self, remote, sha256: str) -> Path:
        """`FOLDER/<sha256>.arrow`: the sha256 comes from a store's manifest, so it must name a file here."""
        remote = storage.path(remote)
        return storage.inside(self.folder, f"{sha256}.arrow", f"{remote.parent / 'manifest.json'}: sha256 of "
                              f"{remote.name}", "prepare the dataset again")

    def prefetch(self, chunks) -> None:
        """Start fetching (remote, sha256, size) chunks in the background."""
        for remote, sha256, size in chunks:
            self._submit(remote, sha256, size)

    def _submit(self, remote, sha256: str, size: int) -> Future:
        with self.lock:
            if sha256 in self.pending:
                return self.pending[sha256]
            if self.pool is None or self.pool_pid != os.getpid():  # none, or inherited through fork
                self.pool, self.pool_pid, self.pending = ThreadPoolExecutor(self.threads, "blues-chunks"), os.getpid(), {}
            future = self.pool.submit(self._fetch, storage.path(remote), sha256, size)
            self.pending[sha256] = future
        future.add_done_callback(lambda _, key=sha256: self._done(key))
        return future

    def _done(self, sha256: str) -> None:
        with self.lock:
            self.pending.pop(sha256, None)

    def _fetch(self, remote, sha256: str, size: int) -> Path:
        target = self.file_of(remote, sha256)
        try:
            if target.stat().st_size == size:
                os.utime(target)  # most recently used
                return target
        except FileNotFoundError:
            pass
        self.folder.mkdir(parents=True, exist_ok=True)
        data = remote.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise BluesError(f"{remote}: sha256 {digest[:16]} differs from {sha256[:16]} in its store's "
                             "manifest.json: the chunk changed after the store was committed; run "
                             "`blues verify` on the store and prepare it again")
        temp = self.folder / f".{sha256}.{os.getpid()}.{threading.get_ident()}.part"
        try:
            temp.write_bytes(data)
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
        self.downloads += 1
        self.evict(keep=target)
        return target

    def evict(self, keep: Path | None = None) -> None:
        """Delete the least recently used chunk files until the folder fits `max_bytes`."""
        files = []
        for path in self.folder.glob("*.arrow"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # another process evicted it
            files.append((stat.st_mtime_ns, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        busy = {self.folder / f"{key}.arrow" for key in list(self.pending)}
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            if path == keep or path == self.handed_out or path in busy:
                continue
            path.unlink(missing_ok=True)
            total -= size
