"""The token store on disk: chunk files, the manifest, the fingerprint, statistics.

A store is a folder with `manifest.json` and `chunk-00000-00000.arrow`, ... (work item, part) Each chunk is an
Arrow IPC file with zstd-compressed buffers, one row per document: `tokens`
(list<uint32>, exactly `encode_ordinary(text)`), `source` (the raw file's label in
`manifest.sources`) and `index` (the document's record number in that file). The
manifest is written last, so a folder without one is not (yet) a dataset.
`blues_train.data.prepare` writes stores; everything else reads them through this module.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import AfterValidator, ConfigDict, Field

from blues_train.io import storage
from blues_train.io.errors import BluesError
from blues_train.io.settings import Settings, validated

FORMAT_VERSION = 1
KIND = "token_store"
MANIFEST = "manifest.json"
JOURNAL = ".prepare-journal.jsonl"  # an unfinished prepare's finished chunks; gone once the manifest is
REMOTE_JOURNAL = ".prepare-journal"  # the same on object storage: one object per chunk under this prefix
# zstd level 3 stores about 0.9 bytes per o200k token (level 1 about 1.0, 9 about 0.8 at 1/5 the speed).
ZSTD_LEVEL = 3
PERCENTILES = (0, 10, 50, 90, 99, 100)
SCHEMA = pa.schema(
    [("tokens", pa.list_(pa.uint32())), ("source", pa.string()), ("index", pa.int64())]
)


def chunk_name(item: int, part: int = 0) -> str:
    """The file of part `part` of work item `item` (`blues_train.data.work_items`)."""
    return f"chunk-{item:05d}-{part:05d}.arrow"


def chunk_path(store_dir, chunk):
    """Path (or `storage.RemotePath`) of a chunk, given its manifest entry (or its file name)."""
    name = chunk["file"] if isinstance(chunk, dict) else str(chunk)
    return storage.path(store_dir) / name


def read_manifest(store_dir, data: bytes | None = None) -> dict:
    """The manifest of a finished token store (`data`: its bytes, already read by
    `manifest_bytes`); BluesError if there is none or it is broken."""
    path = storage.path(store_dir) / MANIFEST
    manifest = storage.parse_json(path, manifest_bytes(store_dir) if data is None else data)
    if not isinstance(manifest, dict) or manifest.get("kind", KIND) != KIND:
        raise BluesError(f"{path}: not a token store manifest (kind {KIND!r} expected)")
    if manifest.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise BluesError(
            f"{path}: format_version {manifest['format_version']} is not supported "
            f"(this Blues reads {FORMAT_VERSION}); prepare the dataset again"
        )
    validated(StoreManifest, manifest, f"{path}: ", advice="; prepare the dataset again")
    named = [(chunk["file"], f"{path}: chunks[{number}].file") for number, chunk in enumerate(manifest["chunks"])]
    named += [(chunk["index"]["file"], f"{path}: chunks[{number}].index.file")
              for number, chunk in enumerate(manifest["chunks"]) if "index" in chunk]
    storage.all_inside(store_dir, named, "prepare the dataset again")  # no symbolic link leads out of the store
    return manifest


def manifest_bytes(store_dir) -> bytes:
    """The bytes of a finished token store's manifest; BluesError if there is none."""
    path = storage.path(store_dir) / MANIFEST
    if not path.is_file():
        raise BluesError(
            f"{store_dir} is not a token store: it has no {MANIFEST} "
            "(never prepared, or its prepare run did not finish: run `blues prepare` again)"
        )
    return storage.read_file(path)


Sha256 = Annotated[str, Field(pattern="^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=0)]


class ManifestPart(Settings):
    """Fields other features record beside these pass through (older and newer Blues share stores)."""

    model_config = ConfigDict(extra="allow")


class TokenizerRecord(ManifestPart):
    name: str
    vocab_sha256: Sha256
    n_vocab: int = Field(gt=0)
    eot_id: Count


class SourceRecord(ManifestPart):
    path: str
    bytes: Count
    sha256: Sha256


def plain_file_name(name: str) -> str:
    if not storage.is_plain_name(name):
        raise ValueError("not a file name inside the store folder (no path separators, not '.' or '..')")
    return name


class IndexRecord(ManifestPart):
    """The chunk's document index (`blues_train.data.doc_index`), optional."""

    file: Annotated[str, AfterValidator(plain_file_name)]
    sha256: Sha256
    bytes: Count


class ChunkRecord(ManifestPart):
    file: Annotated[str, AfterValidator(plain_file_name)]
    sha256: Sha256
    n_docs: Count
    n_tokens: Count
    bytes: Count
    index: IndexRecord | None = None


class Totals(ManifestPart):
    docs: Count
    tokens: Count


class StoreManifest(ManifestPart):
    """What readers of `manifest.json` rely on (`blues_train.data.prepare.build_manifest` writes it)."""

    format_version: Literal[FORMAT_VERSION]
    tokenizer: TokenizerRecord
    sources: list[SourceRecord]
    chunks: list[ChunkRecord]
    totals: Totals
    fingerprint: Sha256


def journal_path(store_dir):
    """Where a prepare run of `store_dir` keeps its journal (a file locally, a prefix remotely)."""
    folder = storage.path(store_dir)
    return folder / (REMOTE_JOURNAL if isinstance(folder, storage.RemotePath) else JOURNAL)


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


def integers(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An integer Arrow array (or chunked array) without nulls as NumPy: a view of its buffer
    when it is one piece. pyarrow's own `to_numpy` imports pandas on first use, 0.2 s of every
    command that reads a chunk."""
    if isinstance(array, pa.ChunkedArray):
        parts = [integers(piece) for piece in array.chunks]
        return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, str(array.type))
    if array.null_count or not pa.types.is_integer(array.type):
        return array.to_numpy()
    dtype = np.dtype(str(array.type))
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


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
    return integers(pc.list_value_length(table.column("tokens")))


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
