"""One work item of `blues prepare`, where it runs (a local process or a Ray task): read its
pieces, encode, cut chunks, spot-check and write them straight into the store.

The worker reads documents in order, repairs undecodable bytes and cuts them into batches of
about a MiB of text; the engine encodes them on this thread, or in forked encoding processes
when a local run has fewer items than workers (`encoding_workers`, which also bounds the
engine's caches); chunks close at document boundaries once `chunk_tokens` is reached, and the item's
last chunk holds what is left. A writer thread spot-checks each chunk against tiktoken
(`spot_check`), compresses, hashes and writes it as `chunk-<item>-<part>.arrow` beside its
document index. Everything written depends only on the item, so a retried task writes the
same bytes under the same names. What the item wrote comes back to the driver as one record
(`write_item`), which the driver journals.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from blues_train.data import doc_index, encoding_engine, spot_check, store
from blues_train.data.encoding_workers import encode_batches
from blues_train.data.sources import Piece, SkipLog, piece_documents, repair_text
from blues_train.io import storage

BATCH_CHARS = 1 << 20


@dataclass(frozen=True)
class ItemTask:
    """What a worker needs for one item: everything is plain data (it travels to Ray workers)."""

    out: object  # the store folder: a Path or a storage.RemotePath
    number: int
    pieces: list[Piece]
    positions: dict[str, int]  # source label -> its place in the manifest's sources
    text_field: str
    chunk_tokens: int
    engine: object  # an engine name (encoding_engine.CHOICES) or, run locally, an engine
    encode_workers: int = 1  # processes encoding this item's batches (`encoding_workers`); 1: this thread


def write_item(task: ItemTask) -> dict:
    """Read, encode and write the item's chunks; the record the driver journals."""
    engine = encoding_engine.load_engine(task.engine) if isinstance(task.engine, str) else task.engine
    skips, seen = SkipLog(), [False]
    docs = piece_documents(task.pieces, task.text_field, skips, seen)
    with ChunkBuilder(task, engine) as builder:
        jobs = ((batch, batch.texts) for batch in _batches(docs))
        for batch, ids in encode_batches(jobs, engine, task.encode_workers):
            builder.add(batch, ids)
        builder.flush()
    return {"item": task.number, "chunks": builder.records, "skips": skips.reasons,
            "missing_field_first": skips.missing_field_first, "seen_field": seen[0],
            "lengths": sorted(builder.lengths.items()),
            "input_bytes": sum(c["input_bytes"] for c in builder.records)}


@dataclass
class Batch:
    """Consecutive documents and their text as the engine sees it: undecodable bytes
    repaired (`repaired`), with the UTF-8 size of each text."""

    docs: list = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    repaired: list[bool] = field(default_factory=list)
    chars: int = 0

    def add(self, doc) -> None:
        text, size, fixed = decoded(doc.text)
        self.docs.append(doc)
        self.texts.append(text)
        self.sizes.append(size)
        self.repaired.append(fixed)
        self.chars += len(text)


def decoded(text: str) -> tuple[str, int, bool]:
    """`text` with its undecodable bytes turned into U+FFFD, its UTF-8 size, and whether any were."""
    try:
        return text, len(text) if text.isascii() else len(text.encode("utf-8")), False
    except UnicodeEncodeError:
        text = repair_text(text)
        return text, len(text.encode("utf-8")), True


def _batches(docs):
    """Consecutive documents, about BATCH_CHARS of text per batch."""
    batch = Batch()
    for doc in docs:
        batch.add(doc)
        if batch.chars >= BATCH_CHARS:
            yield batch
            batch = Batch()
    if batch.docs:
        yield batch


class ChunkBuilder:
    """Collects tokenized documents and writes a chunk whenever chunk_tokens is reached.

    Spot-checking, compressing, hashing and writing a chunk run on one writer thread (zstd,
    sha256 and file I/O release the GIL, tiktoken for part of its work), so this thread
    reads and encodes meanwhile; at most one finished chunk waits for it, in order. Leaving
    the `with` block waits for the last write.
    """

    def __init__(self, task: ItemTask, engine):
        self.task, self.engine = task, engine
        self.reference = None if engine.is_reference else encoding_engine.load_engine("tiktoken")
        self.writer = ThreadPoolExecutor(1)
        self.pending = None
        self.records: list[dict] = []
        self.lengths = Counter()
        self._reset()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.writer.shutdown(wait=True)
        if exc_type is None:
            self._wait()

    def _wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def _reset(self) -> None:
        self.arrays, self.texts, self.locations, self.sources, self.indices = [], [], [], [], []
        self.n_tokens, self.input_bytes, self.repaired = 0, 0, 0

    def add(self, batch: Batch, ids: list[np.ndarray]) -> None:
        """`ids`: each document's token ids."""
        for doc, text, doc_ids, size, fixed in zip(batch.docs, batch.texts, ids, batch.sizes, batch.repaired):
            self.arrays.append(doc_ids)
            self.texts.append(text)
            self.locations.append(doc.location)
            self.sources.append(doc.source)
            self.indices.append(doc.index)
            self.n_tokens += len(doc_ids)
            self.input_bytes += size
            self.repaired += fixed
            if self.n_tokens >= self.task.chunk_tokens:
                self.flush()

    def flush(self) -> None:
        """Hand the collected documents to the writer thread as the next chunk."""
        if not self.arrays:
            return
        lengths = np.fromiter(map(len, self.arrays), dtype=np.int64, count=len(self.arrays))
        tokens = np.concatenate(self.arrays).astype(np.uint32, copy=False)
        job = (tokens, lengths, self.texts, self.locations, self.sources, self.indices, self.input_bytes,
               self.repaired)
        self._wait()
        self.pending = self.writer.submit(self._write, *job)
        self._reset()

    def _write(self, tokens, lengths, texts, locations, sources, indices, input_bytes: int, repaired: int) -> None:
        checked = (0, 0)
        if self.reference is not None:
            checked = spot_check.check_chunk(self.engine, self.reference, texts, locations, sources, indices,
                                             tokens, lengths)
        data = store.encode_chunk(tokens, lengths, sources, indices)
        name = store.chunk_name(self.task.number, len(self.records))
        index = doc_index.encode_index(lengths, [self.task.positions[s] for s in sources], indices)
        out = self.task.out
        storage.write_bytes(out / doc_index.index_name(name), index)
        storage.write_bytes(out / name, data)
        self.records.append({"file": name, "sha256": hashlib.sha256(data).hexdigest(),
                             "n_docs": len(lengths), "n_tokens": len(tokens), "bytes": len(data),
                             "index": doc_index.index_entry(doc_index.index_name(name), index),
                             "input_bytes": input_bytes, "repaired": repaired,
                             "spot_checked_docs": checked[0], "spot_checked_tokens": checked[1]})
        self.lengths.update(lengths.tolist())
