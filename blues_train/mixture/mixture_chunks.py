"""The chunks of a mixture's stores, numbered in order, and what a start-up needs of each.

Reading a store manifest whole (JSON, validation, every name checked to stay inside the
store, the fingerprint) costs about 7 us per chunk: 14 ms per rank at 4B tokens, seconds at
1T. A rank's start needs of each chunk only its file name, tokens, sha256 and bytes, so these
are kept, once checked, as a small table per store in the mixture's plan cache
(`chunks-<key>.npy`, a structured array: no pickle). The key hashes what the check depended
on: the manifest's bytes, the store fingerprint the mixture recorded, and the identity and
modification times of a local store folder (a symbolic link put in it afterwards changes its
mtime). Like git's index, a folder changed within the last RACY_NS is not trusted to show a
later change in its mtime: its table is not kept until it has been still for that long. The
manifest itself is read and checked only where its other fields are needed (building the
document table, lineage).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence

import numpy as np

from blues_train.data import store
from blues_train.io import storage
from blues_train.io.errors import BluesError
from blues_train.mixture.plan_cache import PlanCache
from blues_train.mixture.spec import source_manifest

TABLE_VERSION = 1  # of the chunk table's layout, in its key
FIELDS = ("file", "n_tokens", "bytes", "sha256")
RACY_NS = 3_000_000_000  # coarser than any file system's mtime granularity (FAT: 2 s)
TABLES_KEPT = 4  # per source: older ones are pruned when a new one is written


class MixtureChunks:
    """The chunks of a mixture's stores, numbered in order: `paths[c]`, `n_tokens[c]`,
    `meta[c]` = (sha256, bytes), `owner(c)` = (store, its number there); `manifest(i)` is store
    i's manifest, read and checked when first asked for."""

    def __init__(self, mixture: dict, tables: list[np.ndarray], manifests: dict[int, dict]):
        self.mixture, self.tables, self._manifests = mixture, tables, manifests
        self.folders = [storage.path(entry["path"]) for entry in mixture["sources"]]
        self.bounds = np.cumsum([0] + [len(table) for table in tables])  # source i: [bounds[i], bounds[i + 1])
        self.n_tokens = np.concatenate([table["n_tokens"] for table in tables] or [np.zeros(0, np.int64)])
        self.paths, self.meta = ChunkPaths(self), ChunkMeta(self)

    @classmethod
    def of(cls, mixture: dict, cache: PlanCache | None = None) -> "MixtureChunks":
        """The mixture's chunks, each store's table from `cache` where it holds a valid one."""
        tables, manifests = [], {}
        for i, entry in enumerate(mixture["sources"]):
            table, manifest = source_table(entry, i, cache)
            tables.append(table)
            if manifest is not None:
                manifests[i] = manifest
        return cls(mixture, tables, manifests)

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def owner(self, number: int) -> tuple[int, int]:
        """(mixture source, number within its store) of chunk `number`."""
        if not 0 <= number < len(self):
            raise IndexError(number)
        source = int(np.searchsorted(self.bounds, number, side="right")) - 1
        return source, number - int(self.bounds[source])

    def manifest(self, source: int) -> dict:
        """Store `source`'s manifest, checked (and its fingerprint against the mixture's)."""
        if source not in self._manifests:
            self._manifests[source] = source_manifest(self.mixture["sources"][source])
        return self._manifests[source]


class ChunkPaths(Sequence):
    """Chunk c's path (or `storage.RemotePath`), made when asked for."""

    def __init__(self, chunks: MixtureChunks):
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, number: int):
        source, local = self.chunks.owner(number)
        name = str(self.chunks.tables[source]["file"][local])
        if not storage.is_plain_name(name):  # a table is read from a file: checked again where used
            raise BluesError(f"chunk {number} of the loader's index cache is named {name!r}, not a file "
                             "name; delete the index cache folder (--index_cache_dir) and start again")
        return self.chunks.folders[source] / name


class ChunkMeta(Sequence):
    """Chunk c's (sha256, bytes), as a remote copy is checked against."""

    def __init__(self, chunks: MixtureChunks):
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, number: int) -> tuple[str, int]:
        source, local = self.chunks.owner(number)
        row = self.chunks.tables[source][local]
        return row["sha256"].decode("ascii"), int(row["bytes"])


def chunk_table(manifest: dict) -> np.ndarray:
    """A checked manifest's chunks as a structured array of FIELDS."""
    chunks = manifest["chunks"]
    width = max([len(chunk["file"]) for chunk in chunks], default=1)
    table = np.zeros(len(chunks), dtype=[("file", f"U{width}"), ("n_tokens", "<i8"), ("bytes", "<i8"),
                                         ("sha256", "S64")])
    for column in FIELDS:
        table[column] = [chunk[column] for chunk in chunks]
    return table


def source_table(entry: dict, source: int, cache: PlanCache | None) -> tuple[np.ndarray, dict | None]:
    """Mixture source `entry`'s chunk table, and its manifest where it was read: from `cache`
    when it holds the table for these manifest bytes and this folder, else from the manifest
    (and kept in `cache`, unless it cannot be written or the folder changed too recently)."""
    data = store.manifest_bytes(entry["path"])
    key = table_key(entry, data)
    if cache is not None and key is not None:
        prefix = f"chunks-{source}-"
        read: list[dict] = []

        def build(allocate) -> np.ndarray:
            read.append(source_manifest(entry, data))
            return chunk_table(read[0])

        try:
            table = cache.get(f"{prefix}{key}.npy", build, lambda t: t.ndim == 1 and t.dtype.names == FIELDS)
        except BluesError:
            pass  # the cache cannot be written (or the manifest is broken: said again below)
        else:
            if read:
                cache.keep_recent(f"{prefix}*.npy", TABLES_KEPT)
            return table, read[0] if read else None
    manifest = source_manifest(entry, data)
    return chunk_table(manifest), manifest


def table_key(entry: dict, data: bytes) -> str | None:
    """What a chunk table was checked against, hashed; None for a local folder changed within
    RACY_NS (or that cannot be looked at)."""
    folder = storage.path(entry["path"])
    identity = ""
    if not isinstance(folder, storage.RemotePath):  # object storage has no symbolic links
        try:
            info = os.stat(folder)
        except OSError:
            return None
        if time.time_ns() - max(info.st_mtime_ns, info.st_ctime_ns) < RACY_NS:
            return None
        identity = f"{info.st_dev}:{info.st_ino}:{info.st_mtime_ns}:{info.st_ctime_ns}"
    digest = hashlib.sha256(f"{TABLE_VERSION}\0{entry['fingerprint']}\0{identity}\0".encode())
    digest.update(data)
    return digest.hexdigest()[:32]
