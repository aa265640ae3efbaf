"""Observe a raw corpus without reading its documents: its files, their sizes and hashes.

`signature` is cheap (names, sizes, modification times; an object's ETag) and tells whether anything may
have changed; `observe` adds each file's sha256 and `corpus_version`, the corpus's identity.
Files are found exactly as `blues prepare` finds them (`sources.discover_sources`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from blues_train.data.sources import DEFAULT_GLOB, discover_sources
from blues_train.data.store import file_sha256


@dataclass(frozen=True)
class RawFile:
    path: str
    label: str  # the name the token store records for this file
    format: str
    bytes: int
    mtime_ns: int  # 0 for an object in object storage: its etag tells a change
    sha256: str | None = None
    etag: str = ""  # an object's ETag (changes whenever it is rewritten); "" for local files


def list_files(inputs, fmt: str | None = None, glob: str = DEFAULT_GLOB) -> list[RawFile]:
    """The corpus's files with sizes and modification times (no content read)."""
    files = []
    for source in discover_sources(inputs, fmt, glob):
        if source.listed is not None:  # an object: size and ETag from the listing
            files.append(RawFile(str(source.path), source.label, source.fmt, source.listed[0], 0,
                                 etag=source.listed[1]))
            continue
        stat = source.path.stat()
        files.append(RawFile(str(source.path), source.label, source.fmt, stat.st_size, stat.st_mtime_ns))
    return files


def signature(files: list[RawFile]) -> str:
    """Changes whenever a file is added, removed, resized or touched."""
    lines = (f"{f.label}\t{f.bytes}\t{f.mtime_ns}" + (f"\t{f.etag}" if f.etag else "") for f in files)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def observe(inputs, fmt: str | None = None, glob: str = DEFAULT_GLOB) -> list[RawFile]:
    """`list_files` with each file's sha256."""
    return [
        RawFile(f.path, f.label, f.format, f.bytes, f.mtime_ns, file_sha256(f.path), f.etag)
        for f in list_files(inputs, fmt, glob)
    ]


def corpus_version(named_hashes) -> str:
    """The corpus's identity from (file label, sha256) pairs: the same for `observe`'s
    files and a token store's `manifest.sources`."""
    lines = (f"{label}\t{sha256}" for label, sha256 in named_hashes)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
