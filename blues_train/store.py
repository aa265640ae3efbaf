"""The token store on disk: chunk files, the manifest, the fingerprint, statistics.

A store is a folder with `manifest.json` and `chunk-00000.arrow`, ... Each chunk is an
Arrow IPC file with zstd-compressed buffers, one row per document: `tokens`
(list<uint32>, exactly `encode_ordinary(text)`), `source` (the raw file's label in
`manifest.sources`) and `index` (the document's record number in that file). The
manifest is written last, so a folder without one is not (yet) a dataset.
`blues_train.prepare` writes stores; everything else reads them through this module.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from blues_train import storage
from blues_train.errors import BluesError

FORMAT_VERSION = 1
KIND = "token_store"
MANIFEST = "manifest.json"
# zstd level 3 stores about 0.9 bytes per o200k token (level 1 about 1.0, 9 about 0.8 at 1/5 the speed).
ZSTD_LEVEL = 3
PERCENTILES = (0, 10, 50, 90, 99, 100)
SCHEMA = pa.schema(
    [("tokens", pa.list_(pa.uint32())), ("source", pa.string()), ("index", pa.int64())]
)
REQUIRED = ("format_version", "tokenizer", "sources", "chunks", "totals", "fingerprint")


def chunk_name(number: int) -> str:
    return f"chunk-{number:05d}.arrow"


def chunk_path(store_dir, chunk):
    """Path (or `storage.RemotePath`) of a chunk, given its manifest entry (or its file name)."""
    name = chunk["file"] if isinstance(chunk, dict) else str(chunk)
    return storage.path(store_dir) / name


def read_manifest(store_dir) -> dict:
    """The manifest of a finished token store; BluesError if there is none or it is broken."""
    path = storage.path(store_dir) / MANIFEST
    if not path.is_file():
        raise BluesError(
            f"{store_dir} is not a token store: it has no {MANIFEST} "
            "(never prepared, or its prepare run did not finish: run `blues prepare` again)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BluesError(f"{path}: not valid JSON ({exc}); prepare the dataset again") from None
    if not isinstance(manifest, dict) or manifest.get("kind", KIND) != KIND:
        raise BluesError(f"{path}: not a token store manifest (kind {KIND!r} expected)")
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise BluesError(f"{path}: missing field(s) {', '.join(missing)}; prepare it again")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BluesError(
            f"{path}: format_version {manifest['format_version']} is not supported "
            f"(this Blues reads {FORMAT_VERSION}); prepare the dataset again"
        )
    if not isinstance(manifest["chunks"], list):
        raise BluesError(f"{path}: field chunks must be a list; prepare the dataset again")
    for number, chunk in enumerate(manifest["chunks"]):
        named = [("file", chunk.get("file") if isinstance(chunk, dict) else None)]
        if isinstance(chunk, dict) and "index" in chunk:  # the document index (optional)
            named.append(("index.file", chunk["index"].get("file") if isinstance(chunk["index"], dict) else None))
        for key, name in named:
            if not is_plain_name(name):
                raise BluesError(
                    f"{path}: chunks[{number}].{key} {name!r} is not a file name inside the store "
                    "folder (no path separators, not '.' or '..'); prepare the dataset again"
                )
    return manifest


def is_plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def fingerprint(vocab_sha256: str, chunk_hashes) -> str:
    return hashlib.sha256("\n".join([vocab_sha256, *chunk_hashes]).encode()).hexdigest()


def store_fingerprint(manifest: dict) -> str:
    """The dataset's identity: sha256 of the tokenizer hash and the chunk hashes, in order."""
    return fingerprint(
        manifest["tokenizer"]["vocab_sha256"], [c["sha256"] for c in manifest["chunks"]]
    )


def read_chunk(path, data: bytes | None = None) -> pa.Table:
    """One chunk as an Arrow table: a local file memory-mapped (buffers decompress on read),
    a remote object read whole (or `data`, its bytes already read)."""
    path = storage.path(path)
    try:
        if data is None and isinstance(path, storage.RemotePath):
            data = path.read_bytes()
        if data is not None:
            return pa.ipc.open_file(pa.BufferReader(data)).read_all()
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise BluesError(f"{path}: not a readable Arrow chunk ({exc}); prepare it again") from None


def encode_chunk(tokens: np.ndarray, lengths: np.ndarray, sources, indices) -> bytes:
    """The bytes of one chunk file: documents' tokens (concatenated) split by `lengths`."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens, pa.uint32()))
    table = pa.Table.from_arrays(
        [column, pa.array(sources, pa.string()), pa.array(indices, pa.int64())], schema=SCHEMA
    )
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", ZSTD_LEVEL))
    with pa.ipc.new_file(sink, SCHEMA, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def doc_lengths(table: pa.Table) -> np.ndarray:
    """Tokens per document of a chunk table."""
    return pc.list_value_length(table.column("tokens")).to_numpy(zero_copy_only=False)


def write_manifest(store_dir, manifest: dict) -> None:
    data = json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
    storage.write_bytes(storage.path(store_dir) / MANIFEST, data.encode("utf-8"))


def percentiles(length_counts: Counter) -> dict:
    """Nearest-rank percentiles of document lengths, from a {length: count} counter."""
    total = sum(length_counts.values())
    if not total:
        return {f"p{p}": 0 for p in PERCENTILES}
    lengths = sorted(length_counts)
    counts = np.cumsum([length_counts[n] for n in lengths])
    result = {}
    for p in PERCENTILES:
        rank = max(1, -(-p * total // 100))  # ceil(p% of total), at least the first
        result[f"p{p}"] = int(lengths[int(np.searchsorted(counts, rank))])
    return result


def file_sha256(path) -> str:
    if storage.is_remote(path):
        return storage.sha256(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
