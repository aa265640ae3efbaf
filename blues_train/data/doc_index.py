"""The document index of a token store: per chunk, what the loader, lineage and verify need
about each document, uncompressed, so that nobody decompresses tokens to learn it.

`chunk-00000.idx` beside `chunk-00000.arrow` is a NumPy `.npy` file (little-endian, readable
with `np.load(path, mmap_mode="r")`) holding one record per row of the chunk:

    length  <u4  the document's tokens
    source  <u4  its raw file: the position in the manifest's `sources`
    index   <i8  its record number in that file

The chunk's manifest entry names it, `"index": {"file", "sha256", "bytes"}` (an optional key;
the store fingerprint does not include it). Stores prepared before the index existed have
no such key: their index is derived once from the chunk and kept, named by the chunk's
sha256, under the cache root (`$BLUES_CACHE_DIR/doc-index/`), for every later reader.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from blues_train.data import store
from blues_train.io import storage
from blues_train.io.atomic import os_error, write_atomic
from blues_train.io.errors import BluesError
from blues_train.io.npy_header import saved_header

DTYPE = np.dtype([("length", "<u4"), ("source", "<u4"), ("index", "<i8")])
SUFFIX = ".idx"


def index_name(chunk_file: str) -> str:
    """`chunk-00000.arrow` -> `chunk-00000.idx`."""
    return chunk_file.removesuffix(".arrow") + SUFFIX


def encode_index(lengths, source_positions, indices) -> bytes:
    """The bytes of one chunk's index file."""
    records = np.empty(len(lengths), dtype=DTYPE)
    records["length"], records["source"], records["index"] = lengths, source_positions, indices
    buffer = io.BytesIO()
    np.save(buffer, records, allow_pickle=False)
    return buffer.getvalue()


def index_entry(name: str, data: bytes) -> dict:
    """What a chunk's manifest entry records of its index file."""
    return {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def derive_index(table, labels: list[str], where) -> bytes:
    """The index bytes of a chunk table (`labels`: the manifest's source labels, in order)."""
    position = {label: number for number, label in enumerate(labels)}
    names = table.column("source").to_pylist()
    unknown = next((name for name in names if name not in position), None)
    if unknown is not None:
        raise BluesError(f"{where}: source {unknown!r} is not in its store's manifest.json sources; "
                         "run `blues verify` and prepare the dataset again")
    return encode_index(store.doc_lengths(table), [position[name] for name in names],
                        store.integers(table.column("index")))


def as_written(data: bytes, n_docs: int) -> np.ndarray | None:
    """The records of an index file whose .npy header is exactly the one `np.save` writes for
    `n_docs` records (read-only, no header parsing: a start-up reads thousands); else None."""
    prefix = saved_header(DTYPE, (n_docs,))
    if len(data) != len(prefix) + n_docs * DTYPE.itemsize or not data.startswith(prefix):
        return None
    return np.frombuffer(data, dtype=DTYPE, offset=len(prefix))


def decode_index(data, where, chunk: dict) -> np.ndarray:
    """An index file's records (`data`: a local path, read whole, or bytes); BluesError unless
    it holds the documents and tokens its chunk's manifest entry counts."""
    try:
        data = data if isinstance(data, bytes) else Path(data).read_bytes()
    except OSError as exc:
        raise os_error(exc, where, "reading") from None
    records = as_written(data, chunk["n_docs"])
    if records is None:  # not the header prepare writes: read it as any .npy (checked below)
        try:
            records = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BluesError(f"{where}: not a document index ({exc}); run `blues verify`") from None
    if records.dtype != DTYPE or records.shape != (chunk["n_docs"],) \
            or int(records["length"].sum(dtype=np.int64)) != chunk["n_tokens"]:
        raise BluesError(f"{where}: not the index of {chunk['file']} ({chunk['n_docs']} documents, "
                         f"{chunk['n_tokens']} tokens); run `blues verify`")
    return records


def chunk_index(store_dir, manifest: dict, number: int, local_chunk=None) -> np.ndarray:
    """Chunk `number`'s index records (one small read: 16 bytes per document). `local_chunk()`: where the
    chunk itself is read from when the index must be derived (default: its path)."""
    chunk = manifest["chunks"][number]
    entry = chunk.get("index")
    if entry is not None:
        return written_index(store_dir, chunk, entry)
    return derived_index(chunk, [s["path"] for s in manifest["sources"]],
                         local_chunk or (lambda: store.chunk_path(store_dir, chunk)))


def written_index(store_dir, chunk: dict, entry: dict) -> np.ndarray:
    """The index file prepare wrote: read (its size checked) or, remote, read in one request and
    checked against its sha256."""
    path = storage.path(store_dir) / entry["file"]  # a plain name: store.read_manifest checked it
    if isinstance(path, storage.RemotePath):
        with storage.user_errors(path, "reading"):
            data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise BluesError(f"{path}: sha256 differs from its store's manifest.json: the index changed "
                             "after the store was committed; run `blues verify` and prepare it again")
        return decode_index(data, path, chunk)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise os_error(exc, path, "reading") from None
    if size != entry["bytes"]:
        raise BluesError(f"{path}: {size} bytes, its store's manifest.json says {entry['bytes']}; "
                         "run `blues verify` and prepare the dataset again")
    return decode_index(path, path, chunk)


def derived_index(chunk: dict, labels: list[str], local_chunk) -> np.ndarray:
    """The index of a chunk prepared without one: derived from the chunk once, then kept under
    the cache root by the chunk's sha256 (the labels are part of the name: they give the
    source positions)."""
    key = hashlib.sha256("\n".join([chunk["sha256"], *labels]).encode()).hexdigest()
    cached = derived_folder() / f"{key}.npy"
    if cached.is_file():
        try:
            return decode_index(cached, cached, chunk)
        except BluesError:
            pass  # damaged: derived again below
    chunk_file = local_chunk()
    data = derive_index(store.read_chunk(chunk_file), labels, chunk_file)
    write_atomic(cached, data)
    return decode_index(cached, cached, chunk)


def derived_folder() -> Path:
    return storage.cache_root() / "doc-index"


def verify_index(store_dir, chunk: dict, table, labels: list[str]) -> tuple[object, str] | None:
    """(file, problem) of a chunk's written index, checked against the chunk's table; None when
    it is right or the chunk has none."""
    entry = chunk.get("index")
    if entry is None:
        return None
    path = storage.path(store_dir) / str(entry.get("file"))
    try:
        data = path.read_bytes()
    except OSError:
        return path, "missing: listed in manifest.json but not readable"
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        return path, "sha256 differs from manifest.json: the file is corrupt or was replaced"
    expected = np.load(io.BytesIO(derive_index(table, labels, path)), allow_pickle=False)
    try:
        written = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError:
        written = None
    if written is None or written.dtype != DTYPE or not np.array_equal(written, expected):
        return path, f"does not describe the documents of {chunk['file']}: prepare the dataset again"
    return None
