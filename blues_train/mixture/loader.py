"""Packed training windows from a mixture: deterministic, rank-sharded, exactly resumable.

The stream, for one split (`train`, or the held-out `val` documents):
- Each source's documents form an endless *source stream*: its epoch k is all of its
  documents in an order drawn from (mixture seed, loader seed, split, source, k), chunks
  shuffled and documents shuffled within each chunk, so that one decompressed chunk per
  source serves many consecutive windows.
- Pass e of the mixture takes tokens [e*T, (e+1)*T) of each source stream, T being the
  source's `tokens` in mixture.json (val: each held-out document once per pass). Realized
  shares are therefore exact; a document cut at a pass boundary goes on in the next pass.
- The pieces of all sources are interleaved by progress through their own share (a piece
  at token p of T sorts at p/T), each followed by EOT (199999), and cut into windows of
  seq_len + 1 tokens with stride seq_len. A pass's tail shorter than a window is dropped.

Windows are numbered globally across passes. From its starting position, rank r of
world_size W takes windows r, r+W, r+2W, ...; DataLoader workers split a rank's windows in
blocks of `batch_size`, so the batches arrive in the same order as without workers.
The state is the position of the next window no rank has consumed (pass, window in
pass), valid for any world size: a run saved on N ranks resumes on M.

Lineage. The plan of a pass maps every packed position back to a document, so a global
window number tells exactly which documents it holds (`window_pieces`: no I/O), and
`document_ids` names them (raw file, sha256, index in the file) from the stores' document
index; `document_windows` answers the reverse question. `blues lineage`
(blues_train/serving/lineage.py) is built on these.

Start-up reads no tokens. Each store's document index (blues_train/data/doc_index.py) gives
every document's length and identity; the split's document table and each pass plan are
built from it once per machine and memory-mapped (blues_train/mixture/plan_cache.py), keyed on the
mixture fingerprint, seed, split and pass. From the middle of a pass on, the next one's plan
is built on a background thread; each rank packs only its own windows. With several ranks,
each chunk is decompressed once per machine into an uncompressed token file beside the plans,
which every rank reads only its own windows from (ChunkCache).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from blues_train.data import doc_index, store
from blues_train.data.tokenizer import EOT_ID
from blues_train.io import storage
from blues_train.io.chunk_files import ChunkFiles
from blues_train.io.errors import BluesError
from blues_train.mixture.mixture_chunks import MixtureChunks
from blues_train.mixture.plan_cache import PlanCache, cache_folder, in_memory
from blues_train.mixture.spec import held_out_by_base, read_mixture, source_base

SPLITS = ("train", "val")
STATE_VERSION = 1
BLOCK_TOKENS = 1 << 20  # windows are cut from the packed stream about this many at a time
# The document table and pass plans are int64 tables stored column-major, so that each column
# is contiguous in the mapped file (np.searchsorted on a strided column would copy it whole).
DOCUMENT = {"chunk": 0, "row": 1, "start": 2, "length": 3}
PIECE = {"doc": 0, "start": 1, "length": 2, "packed_start": 3}  # chunk and source: from the document
PLANS_KEPT = 3  # pass plans a loader keeps mapped, and the cache keeps on disk per split and seed
TOKEN_FILE_PREFIX = "tokens-"
TOKEN_FILES_KEPT = 32  # uncompressed chunk token files kept on disk per mixture (ChunkCache)
BATCH_DOCUMENTS = 1 << 18  # index records read and filtered together (split_batches)
PACK_RUNS = 32  # runs of a rank's consecutive windows packed together (with many ranks: windows)


@dataclass
class Source:
    """One source's documents of the split: where each one's tokens are, and how many (views
    of the split's document table, from document `first` on)."""

    chunk: np.ndarray  # int32: index into the mixture's chunk list
    start: np.ndarray  # int64: offset of the document's first token in its chunk
    length: np.ndarray  # int64: tokens (> 0)
    row: np.ndarray  # int32: the document's row in its chunk
    per_pass: int  # tokens this source contributes to each pass
    tokens: int  # tokens of all its documents in the split
    first: int  # its first document's number in the split's document table


@dataclass(frozen=True)
class WindowPiece:
    """The part of one document a window holds: the document's tokens [doc_start, doc_end)
    are the window's tokens [window_start, window_end). Every window position no piece
    covers is an EOT."""

    source: int  # the mixture source (index into mixture["sources"])
    chunk: int  # index into the mixture's chunk list (`PackedSequenceDataset.chunk_paths`)
    row: int  # the document's row in that chunk
    doc_start: int
    doc_end: int
    doc_length: int  # the whole document's tokens
    window_start: int
    window_end: int

    @property
    def document(self) -> tuple[int, int, int]:
        """(source, chunk, row): the document's key within the mixture."""
        return self.source, self.chunk, self.row


@dataclass(frozen=True)
class DocumentId:
    """Who a document is: its token store, raw file (label in the store's manifest, and
    sha256) and record number in that file (the chunk's `source` and `index` columns)."""

    dataset: str  # the store folder, as the mixture records it
    source: str
    sha256: str
    index: int

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "source": self.source, "sha256": self.sha256, "index": self.index}


@dataclass(frozen=True)
class DocumentWindow:
    """One place a document was trained on: the document's tokens [doc_start, doc_end) are
    tokens [window_start, window_end) of global window `window` (`epoch`: the mixture pass)."""

    window: int
    epoch: int
    window_in_pass: int
    doc_start: int
    doc_end: int
    window_start: int
    window_end: int


@dataclass
class Pass:
    """One pass of the mixture as pieces of documents, in stream order (views of its plan)."""

    doc: np.ndarray  # the piece's document: its number in the split's document table
    start: np.ndarray  # offset of the piece's first token in its chunk
    length: np.ndarray
    packed_start: np.ndarray  # position of each piece in the packed stream (EOTs included)
    n_windows: int
    documents: np.ndarray  # the split's document table
    source_firsts: np.ndarray  # each source's first document number (ascending)

    @classmethod
    def of(cls, plan: np.ndarray, seq_len: int, documents: np.ndarray, source_firsts: np.ndarray) -> "Pass":
        """The pass whose pieces are `plan` (a PIECE table), cut into windows of seq_len."""
        doc, start, length, packed_start = plan.T
        packed_end = int(packed_start[-1] + length[-1] + 1)
        return cls(doc, start, length, packed_start, max(packed_end - 1, 0) // seq_len, documents, source_firsts)

    def chunks(self, pieces) -> np.ndarray:
        """The chunk of each of these pieces (a slice or an index array)."""
        return self.documents[:, DOCUMENT["chunk"]][self.doc[pieces]]

    def source(self, k: int) -> int:
        """The mixture source of piece k."""
        return int(np.searchsorted(self.source_firsts, self.doc[k], side="right")) - 1


class ChunkCache:
    """The decompressed tokens of the most recently used chunks, at most `capacity`.

    Remote chunks (`paths` entries that are `storage.RemotePath`s) are read from their local
    copies in `files` (a `ChunkFiles`), given each chunk's (sha256, bytes) in `chunks`.

    With `shared` (the mixture's PlanCache, for ranks of a multi-rank run), a chunk is
    decompressed once per machine into `tokens-<sha256>.npy` there, uncompressed, and every
    rank and DataLoader worker reads from that file only its own windows' tokens (at world 64
    about 1/64 of each chunk), with pread, instead of decompressing the whole chunk itself.
    At most TOKEN_FILES_KEPT such files stay on disk (the ranks of a node read the same few
    chunks at a time). Where the folder cannot take them (read-only, full), chunks are
    decompressed in memory as without `shared`.
    """

    def __init__(self, paths: list, n_tokens: list[int], capacity: int, files: ChunkFiles | None = None,
                 chunks: list | None = None, shared: PlanCache | None = None):
        self.paths, self.n_tokens, self.capacity = paths, n_tokens, capacity
        self.files, self.chunks, self.shared = files, chunks, shared
        self.tokens: OrderedDict[int, np.ndarray | TokenFile] = OrderedDict()

    def local_path(self, chunk: int):
        """Where chunk `chunk` is read from: its own path, or its local copy."""
        return chunk_file(self.paths, self.files, self.chunks, chunk)

    def prefetch(self, chunks) -> None:
        """Fetch these chunks' objects ahead, in the background (remote chunks only)."""
        if self.files is not None:
            self.files.prefetch((self.paths[c], *self.chunks[c]) for c in chunks
                                if c not in self.tokens and isinstance(self.paths[c], storage.RemotePath))

    def copy_many(self, chunk: int, starts: list[int], targets: list[int], sizes: list[int], out: np.ndarray) -> None:
        """Chunk `chunk`'s tokens [starts[i], starts[i] + sizes[i]) into out[targets[i]:], for each i."""
        tokens = self.get(chunk)
        if isinstance(tokens, TokenFile):
            tokens.read_many(starts, targets, sizes, out)
        else:
            for start, target, size in zip(starts, targets, sizes):
                out[target: target + size] = tokens[start: start + size]

    def get(self, chunk: int) -> np.ndarray | TokenFile:
        if chunk in self.tokens:
            self.tokens.move_to_end(chunk)
            return self.tokens[chunk]
        tokens = self._shared(chunk) if self.shared is not None else None
        if tokens is None:
            tokens = self._decompress(chunk)
        self.tokens[chunk] = tokens
        if len(self.tokens) > self.capacity:
            self.tokens.popitem(last=False)
        return tokens

    def _decompress(self, chunk: int) -> np.ndarray:
        tokens = chunk_tokens(store.read_chunk(self.local_path(chunk)))
        if len(tokens) != self.n_tokens[chunk]:
            raise BluesError(
                f"{self.paths[chunk]}: holds {len(tokens)} tokens, the manifest says "
                f"{self.n_tokens[chunk]}; it changed while training: run `blues verify`"
            )
        return tokens

    def _shared(self, chunk: int) -> np.ndarray | None:
        """Chunk `chunk`'s tokens from the machine's token file (built if missing), or None
        where the cache folder cannot hold it."""
        name = f"{TOKEN_FILE_PREFIX}{self.chunks[chunk][0][:32]}.npy"
        size = int(self.n_tokens[chunk])
        if hasattr(os, "preadv") and (opened := self.shared.open(name, np.uint32, (size,))) is not None:
            return TokenFile(self.shared.folder / name, *opened)
        built = not self.shared.has(name)
        try:
            tokens = self.shared.get(name, lambda allocate: self._decompress(chunk),
                                     lambda a: a.dtype == np.uint32 and a.shape == (size,))
        except BluesError:
            if self.shared.has(name):
                raise  # written but unreadable: the disk is failing
            self.shared = None  # read-only or full: this process decompresses in memory
            return None
        if built:
            self.shared.keep_recent(f"{TOKEN_FILE_PREFIX}*.npy", TOKEN_FILES_KEPT)
        if not hasattr(os, "preadv"):
            return tokens
        try:
            mapped = tokens.base
            return TokenFile(mapped.filename, os.open(mapped.filename, os.O_RDONLY | os.O_CLOEXEC), mapped.offset)
        except OSError:
            return tokens  # pruned since it was mapped: the mapping still reads it


class TokenFile:
    """A chunk's token file (`fd`: open on `path`, its tokens from byte `offset`), checked by
    PlanCache and read with pread: a rank of many reads a few pages of each chunk, and mapping
    them costs more than the copies. The open file keeps the tokens readable if the file is
    pruned meanwhile."""

    def __init__(self, path, fd: int, offset: int):
        self.path, self.fd, self.offset = path, fd, offset

    def read_many(self, starts: list[int], targets: list[int], sizes: list[int], out: np.ndarray) -> None:
        """Tokens [starts[i], starts[i] + sizes[i]) into out[targets[i]:], for each i."""
        fd, offset, item, preadv = self.fd, self.offset, out.itemsize, os.preadv
        done = sum(preadv(fd, [out[t: t + n]], offset + s * item) for s, t, n in zip(starts, targets, sizes))
        if done != sum(sizes) * item:
            raise BluesError(f"{self.path}: shorter than when it was checked; it changed while training "
                             "(delete it: it is rebuilt from its chunk)")

    def __del__(self, close=os.close):  # os itself may be gone when the interpreter exits
        if hasattr(self, "fd"):
            close(self.fd)


def chunk_file(paths: list, files: ChunkFiles | None, chunks: list | None, chunk: int):
    """Chunk `chunk`'s own path, or for a remote one its verified local copy."""
    path = paths[chunk]
    if files is None or not isinstance(path, storage.RemotePath):
        return path
    sha256, size = chunks[chunk]
    return files.local(path, sha256, size)


def plan_chunks(plan: "Pass", first: int, end: int) -> list[int]:
    """The chunks the pass's packed tokens [first, end) come from, in stream order."""
    lo = max(int(np.searchsorted(plan.packed_start, first, side="right")) - 1, 0)
    hi = int(np.searchsorted(plan.packed_start, end, side="left"))
    return list(dict.fromkeys(plan.chunks(slice(lo, hi)).tolist()))


def chunk_tokens(table: pa.Table) -> np.ndarray:
    """All tokens of a chunk table, documents concatenated, as one uint32 array."""
    parts = [store.integers(batch.values) for batch in table.column("tokens").chunks]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def chunk_index(mixture: dict, chunks: MixtureChunks, files: ChunkFiles | None, number: int) -> np.ndarray:
    """Chunk `number`'s document index records (doc_index), its chunk fetched only when a store
    without a written index needs it derived."""
    source, local = chunks.owner(number)
    return doc_index.chunk_index(mixture["sources"][source]["path"], chunks.manifest(source), local,
                                 lambda: chunk_file(chunks.paths, files, chunks.meta, number))


def is_table(array: np.ndarray, columns: dict) -> bool:
    """Whether a mapped array is a table of these int64 columns, stored column-major."""
    return (array.dtype == np.int64 and array.ndim == 2 and array.shape[1] == len(columns)
            and array.flags.f_contiguous)


def split_documents(mixture: dict, chunks: MixtureChunks, files: ChunkFiles | None, split: str,
                    allocate=in_memory) -> np.ndarray:
    """The split's non-empty documents, every source's in chunk and row order (a DOCUMENT table
    in `allocate`d memory), without those the mixture's dedup result removed."""
    parts = [part for _, part in split_batches(mixture, chunks, files, split)]
    table = allocate((sum(len(part) for part in parts), len(DOCUMENT)))
    for column in range(len(DOCUMENT)):  # each column copied once, contiguous
        if parts:
            np.concatenate([part[:, column] for part in parts], out=table[:, column])
    return table


def split_batches(mixture: dict, chunks: MixtureChunks, files: ChunkFiles | None, split: str):
    """(mixture source, DOCUMENT table) of the split's documents, in chunk and row order, a batch
    of one store's chunks of about BATCH_DOCUMENTS index records at a time."""
    fraction = mixture["validation"]["fraction"]
    removed = removed_rows(mixture)
    bounds = chunks.bounds.tolist()
    for source in range(len(mixture["sources"])):
        manifest = chunks.manifest(source)
        bases = np.array([source_base(s["sha256"]) for s in manifest["sources"]], dtype=np.uint64)
        batch: list[tuple[int, np.ndarray]] = []
        pending = 0  # index records in the batch
        for number in range(bounds[source], bounds[source + 1]):
            batch.append((number, chunk_index(mixture, chunks, files, number)))
            pending += len(batch[-1][1])
            if pending >= BATCH_DOCUMENTS or number + 1 == bounds[source + 1]:
                yield source, batch_documents(batch, chunks, bases, fraction, split,
                                              removed[source] if removed else {})
                batch, pending = [], 0


def batch_documents(batch: list[tuple[int, np.ndarray]], chunks: MixtureChunks, bases: np.ndarray,
                    fraction: float, split: str, removed: dict[int, np.ndarray]) -> np.ndarray:
    """The split's non-empty documents (a DOCUMENT table) of a batch of (chunk number, index
    records) of one store, without the rows `removed` lists ({chunk number in the store: rows})."""
    numbers = [number for number, _ in batch]
    counts = np.array([len(records) for _, records in batch], dtype=np.int64)
    records = np.concatenate([records for _, records in batch])
    firsts = np.cumsum(counts) - counts  # each chunk's first record in the batch
    lengths = records["length"].astype(np.int64)
    keep = held_out_by_base(bases[records["source"]], records["index"], fraction) == (split == "val")
    keep &= lengths > 0
    for number, first, count in zip(numbers, firsts.tolist(), counts.tolist()):
        rows = removed.get(chunks.owner(number)[1])
        if rows is not None:
            keep[first + rows[rows < count]] = False
    chunk_starts = np.cumsum([0] + [chunks.n_tokens[number] for number in numbers[:-1]])
    starts = np.cumsum(lengths) - lengths - np.repeat(chunk_starts, counts)
    rows = np.arange(len(records)) - np.repeat(firsts, counts)
    kept = np.flatnonzero(keep)
    table = np.empty((len(kept), len(DOCUMENT)), dtype=np.int64, order="F")
    table[:, DOCUMENT["chunk"]] = np.repeat(numbers, counts)[kept]
    table[:, DOCUMENT["row"]] = rows[kept]
    table[:, DOCUMENT["start"]] = starts[kept]
    table[:, DOCUMENT["length"]] = lengths[kept]
    return table


def removed_rows(mixture: dict) -> list[dict[int, np.ndarray]] | None:
    """Per mixture source, {chunk number in its store: rows a dedup result removed}; None without one."""
    if not mixture.get("dedup"):
        return None
    from blues_train.mixture import dedup  # only a deduplicated mixture reads Parquet

    return dedup.removed_rows(mixture)


def source_totals(documents: np.ndarray, chunks: MixtureChunks) -> np.ndarray:
    """(documents, tokens) of each source in a split's document table: int64, shape (sources, 2)."""
    chunk, length = documents[:, DOCUMENT["chunk"]], documents[:, DOCUMENT["length"]]
    bounds = np.searchsorted(chunk, chunks.bounds).tolist()
    totals = [[hi - lo, int(length[lo:hi].sum())] for lo, hi in zip(bounds, bounds[1:])]
    return np.array(totals, dtype=np.int64).reshape(-1, 2)


def table_sources(documents: np.ndarray, totals: np.ndarray, mixture: dict, split: str) -> list[Source]:
    """Each source's view of the split's document table."""
    sources, first = [], 0
    for (count, tokens), entry in zip(totals.tolist(), mixture["sources"]):
        chunk, row, start, length = documents[first: first + count].T
        sources.append(Source(chunk, start, length, row,
                              pass_tokens(entry, tokens, split), tokens, first))
        first += count
    return sources


def pass_tokens(entry: dict, tokens: int, split: str) -> int:
    """Tokens a source (its mixture entry; `tokens` in the split) gives each pass: its share in
    train; in val every held-out document once, of the sources the mixture trains on."""
    if split == "train":
        return entry["tokens"]
    return tokens if entry["tokens"] > 0 else 0


def split_tokens(mixture: dict, split: str) -> list[int]:
    """Each source's tokens in `split`, from the document index a batch of chunks at a time
    (memory does not grow with documents)."""
    chunks = MixtureChunks.of(mixture)
    files = ChunkFiles() if any(storage.is_remote(entry["path"]) for entry in mixture["sources"]) else None
    tokens = [0] * len(mixture["sources"])
    for source, documents in split_batches(mixture, chunks, files, split):
        tokens[source] += int(documents[:, DOCUMENT["length"]].sum())
    return tokens


def stream_seeds(mixture: dict, seed: int, split: str) -> list[int]:
    """What a stream's order is drawn from, before the source and epoch numbers."""
    return [mixture["seed"], seed, SPLITS.index(split)]


def epoch_order(source: Source, rng: np.random.Generator) -> np.ndarray:
    """A permutation of the source's documents: chunks shuffled, documents within each, by
    random keys (ties by position). The documents of a chunk are consecutive, so each chunk's
    are sorted alone: the order of `np.lexsort((keys, chunk_rank[chunk]))`, at a fraction of
    its cost. The sorts are quicksorts (SIMD, about twice a stable sort's speed); only when
    two keys of a chunk are equal (about n^2 / 2^54 odds) is the source sorted stably, so the
    order is the same."""
    chunk = source.chunk
    if not len(chunk):
        return np.zeros(0, dtype=np.int64)
    # where each chunk's documents begin (chunk numbers ascend), and the end
    bounds = np.unique(np.searchsorted(chunk, np.arange(int(chunk[0]), int(chunk[-1]) + 2)))
    chunk_rank = rng.permutation(len(bounds) - 1)
    keys = rng.random(len(chunk))
    spans = [bounds[i: i + 2].tolist() for i in np.argsort(chunk_rank).tolist()]

    def sort(kind: str) -> np.ndarray:
        order, at = np.empty(len(chunk), dtype=np.int64), 0
        for lo, hi in spans:
            order[at: at + hi - lo] = np.argsort(keys[lo:hi], kind=kind)
            order[at: at + hi - lo] += lo
            at += hi - lo
        return order

    order = sort("quicksort")
    ranked = keys[order]
    if np.any(ranked[1:] == ranked[:-1]):
        order = sort("stable")
    return order


def source_pieces(source: Source, seeds: list[int], first: int, end: int):
    """Pieces of the source stream's tokens [first, end): (doc indices, offsets, lengths).
    Documents are non-empty, so the ones that overlap [first, end) are one run of the epoch's
    order, found by binary search; only its first and last can be cut."""
    per_epoch = source.tokens
    parts = []
    for epoch in range(first // per_epoch, (end - 1) // per_epoch + 1):
        order = epoch_order(source, np.random.default_rng([*seeds, epoch]))
        length = source.length[order]
        doc_end = np.cumsum(length)
        doc_end += epoch * per_epoch
        lo = int(np.searchsorted(doc_end, first, side="right"))
        hi = int(np.searchsorted(doc_end, end, side="left")) + 1  # the first document ending at or past `end`
        hi = min(hi, len(order))
        lengths, offsets = length[lo:hi], np.zeros(hi - lo, dtype=np.int64)
        head = first - int(doc_end[lo] - length[lo])  # tokens of the first document before `first`
        if head > 0:
            offsets[0] = head
            lengths[0] -= head
        tail = int(doc_end[hi - 1]) - end  # tokens of the last document at or past `end`
        if tail > 0:
            lengths[-1] -= tail
        parts.append((order[lo:hi], offsets, lengths))
    if len(parts) == 1:
        return parts[0]
    return tuple(np.concatenate(column) for column in zip(*parts))


def build_pass(documents: np.ndarray, sources: list[Source], seeds: list[int], epoch: int,
               allocate=in_memory) -> np.ndarray:
    """Pass `epoch` (a PIECE table in `allocate`d memory): every source's share, interleaved by
    progress. Each column is written once, in pass order; chunk and start are read from the
    split's document table by document."""
    def pieces(i: int):
        source = sources[i]
        first = epoch * source.per_pass
        docs, offsets, lengths = source_pieces(source, [*seeds, i], first, first + source.per_pass)
        docs += source.first
        position = np.cumsum(lengths) - lengths
        return (docs, offsets, lengths), (position + lengths / 2) / source.per_pass

    built = [pieces(i) for i, source in enumerate(sources) if source.per_pass > 0]
    runs = [run for run, _ in built]
    order = np.argsort(np.concatenate([progress for _, progress in built]), kind="stable")  # a merge of sorted runs
    del built
    plan = allocate((len(order), len(PIECE)))
    doc, start, length = (plan[:, PIECE[name]] for name in ("doc", "start", "length"))
    for k, column in enumerate((doc, start, length)):
        np.take(np.concatenate([run[k] for run in runs]), order, out=column)
    del runs, order
    start += documents[:, DOCUMENT["start"]][doc]  # start held the offsets into each document
    packed = plan[:, PIECE["packed_start"]]
    np.cumsum(length + 1, out=packed)
    packed -= length + 1
    return plan


def realized_shares(mixture: dict, split: str = "train") -> tuple[list[float], list[int]]:
    """Each source's share of the tokens of pass 0 as this loader builds it, and each
    source's tokens in `split` (what `blues verify` and the merged_dataset asset report).
    A pass takes exactly each source's tokens per pass, so these need only the document
    index, read one chunk at a time: no plan, memory not growing with documents."""
    tokens = split_tokens(mixture, split)
    per_pass = [pass_tokens(entry, count, split) for entry, count in zip(mixture["sources"], tokens)]
    check_sources(per_pass, tokens, mixture, split)
    return (np.array(per_pass) / sum(per_pass)).tolist(), tokens


def pack(plan: Pass, firsts: np.ndarray, spans: np.ndarray, out: np.ndarray, cache: ChunkCache) -> None:
    """Fill `out` with runs of the pass's packed stream (documents joined by EOT), one after
    another: run r is the stream's tokens [firsts[r], firsts[r] + spans[r]). The pieces of all
    runs are found at once and read chunk by chunk (a rank of many reads scattered windows)."""
    ends = firsts + spans
    lo = np.searchsorted(plan.packed_start, firsts, side="right") - 1
    counts = np.searchsorted(plan.packed_start, ends, side="left") - lo
    pieces = np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))
    first, end = np.repeat(firsts, counts), np.repeat(ends, counts)
    base = np.repeat(np.cumsum(spans) - spans - firsts, counts)  # out[base + p] is stream position p
    packed, length = plan.packed_start[pieces], plan.length[pieces]
    a, b = np.maximum(packed, first), np.minimum(packed + length, end)  # the piece's tokens in its run
    eot = packed + length  # each piece is followed by one EOT
    out[(base + eot)[(eot >= first) & (eot < end)]] = EOT_ID
    held = b > a
    chunks = plan.chunks(pieces[held])
    order = np.argsort(chunks, kind="stable")
    targets = (base + a)[held][order].tolist()
    starts = (plan.start[pieces] + a - packed)[held][order].tolist()  # in the chunk
    sizes = (b - a)[held][order].tolist()
    chunks = chunks[order]
    bounds = (np.flatnonzero(np.diff(chunks)) + 1).tolist()
    for i, j in zip([0, *bounds], [*bounds, len(chunks)]):
        cache.copy_many(int(chunks[i]), starts[i:j], targets[i:j], sizes[i:j], out)


class PackedSequenceDataset(IterableDataset):
    """Endless LongTensor windows of `seq_len + 1` token ids from a mixture's `split`.

    `batch_size` matters only with DataLoader workers: give the DataLoader's, so that the
    workers deliver exactly the windows, in exactly the order, of a single process.
    `cache_chunks` bounds memory: at most that many decompressed chunks per process
    (default: two per source plus two). A mixture or stores on object storage are read
    through a local LRU folder of chunk files (`chunk_files.ChunkFiles`: `chunk_cache_dir`,
    default ~/.cache/blues/chunks; at most `chunk_cache_bytes`, default 16 GiB), the chunks
    of the next block of windows fetched on background threads while this one is packed.
    """

    def __init__(self, mixture_dir, seq_len: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, split: str = "train", batch_size: int = 1,
                 cache_chunks: int | None = None, chunk_cache_dir=None, chunk_cache_bytes: int | None = None,
                 chunk_files: ChunkFiles | None = None, index_cache_dir=None):
        check_arguments(seq_len, rank, world_size, split, batch_size)
        self.mixture = read_mixture(mixture_dir)
        if split == "val" and self.mixture["validation"]["fraction"] == 0:
            raise BluesError(f"{mixture_dir}: the mixture holds out no validation documents "
                             "(val_fraction 0); merge again with --val_fraction > 0")
        self.seq_len, self.seed, self.split = seq_len, seed, split
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        remote = storage.is_remote(mixture_dir) or any(storage.is_remote(s["path"]) for s in self.mixture["sources"])
        self.chunk_files = chunk_files or (ChunkFiles(chunk_cache_dir, chunk_cache_bytes) if remote else None)
        self.plan_cache = PlanCache(cache_folder(mixture_dir, self.mixture["fingerprint"], index_cache_dir))
        self.chunks = MixtureChunks.of(self.mixture, self.plan_cache)
        self.chunk_paths, self.chunk_sizes, self.chunk_meta = self.chunks.paths, self.chunks.n_tokens, self.chunks.meta
        self.documents = self.plan_cache.get(f"documents-{split}.npy", self._split_documents,
                                             lambda table: is_table(table, DOCUMENT))
        totals = self.plan_cache.get(f"sources-{split}.npy",
                                     lambda allocate: source_totals(self.documents, self.chunks),
                                     lambda t: t.shape == (len(self.mixture["sources"]), 2)
                                     and int(t[:, 0].sum()) == len(self.documents))
        self.sources = table_sources(self.documents, totals, self.mixture, split)
        check_sources([s.per_pass for s in self.sources], [s.tokens for s in self.sources], self.mixture, split)
        self.cache_chunks = cache_chunks or 2 * len(self.sources) + 2
        self.block_windows = max(1, BLOCK_TOKENS // seq_len)
        self.seeds = stream_seeds(self.mixture, seed, split)
        self._plans: OrderedDict[int, Pass] = OrderedDict()
        self._n_windows: dict[int, int] = {}
        self._ahead: dict[int, Future] = {}  # pass plans being built on background threads
        self._pending_pid = os.getpid()
        self._start, self._start_windows = (0, 0), 0  # where this run began (or resumed)
        self._taken = 0  # windows this rank's own iterator handed out since then
        self._lookup_cache: ChunkCache | None = None  # lineage lookups (window_tokens)
        if self.num_windows(0) == 0:
            raise BluesError(f"{mixture_dir}: one pass of the {split} split is shorter than "
                             f"one window of seq_len + 1 = {seq_len + 1} tokens")

    def _split_documents(self, allocate) -> np.ndarray:
        return split_documents(self.mixture, self.chunks, self.chunk_files, self.split, allocate)

    def pass_plan(self, epoch: int) -> Pass:
        """Pass `epoch`'s plan (mapped from the plan cache); the few most recently used are kept."""
        if epoch in self._plans:
            self._plans.move_to_end(epoch)
        else:
            future = self._pending().pop(epoch, None)
            records = future.result() if future is not None else self._plan_records(epoch)
            self._plans[epoch] = Pass.of(records, self.seq_len, self.documents,
                                         np.array([source.first for source in self.sources]))
            self._n_windows[epoch] = self._plans[epoch].n_windows
            while len(self._plans) > PLANS_KEPT:
                self._plans.popitem(last=False)
        return self._plans[epoch]

    def _plan_records(self, epoch: int) -> np.ndarray:
        pass_tokens_total = sum(source.per_pass for source in self.sources)

        def valid(plan: np.ndarray) -> bool:  # a whole plan ends where the pass's tokens and EOTs do
            return (is_table(plan, PIECE) and len(plan) > 0 and int(plan[-1, PIECE["packed_start"]] + plan[-1, PIECE[
                "length"]]) == pass_tokens_total + len(plan) - 1)

        prefix = f"plan-{self.split}-seed{self.seed}-pass"
        plan = self.plan_cache.get(f"{prefix}{epoch}.npy", lambda allocate: build_pass(
            self.documents, self.sources, self.seeds, epoch, allocate), valid)
        self.plan_cache.keep_recent(f"{prefix}*.npy", PLANS_KEPT)
        return plan

    def _plan_ahead(self, epoch: int) -> None:
        """Start building pass `epoch`'s plan on a background thread, unless it is there. The
        thread is a daemon: a run that ends mid-build is not held up (its temporary file is
        never read)."""
        pending = self._pending()
        if epoch in self._plans or epoch in pending:
            return
        future = pending[epoch] = Future()

        def build() -> None:
            try:
                future.set_result(self._plan_records(epoch))
            except BaseException as exc:  # raised where the plan is needed
                future.set_exception(exc)

        threading.Thread(target=build, name="blues-plan-ahead", daemon=True).start()

    def _pending(self) -> dict[int, Future]:
        """This process's plans being built; a forked DataLoader worker starts with none (the
        parent's threads are not in it)."""
        if self._pending_pid != os.getpid():
            self._ahead, self._pending_pid = {}, os.getpid()
        return self._ahead

    def num_windows(self, epoch: int = 0) -> int:
        """Windows in pass `epoch`, all ranks together (one validation pass, for example)."""
        if epoch not in self._n_windows:
            self.pass_plan(epoch)
        return self._n_windows[epoch]

    def advance(self, position: tuple[int, int], windows: int) -> tuple[int, int]:
        """The (pass, window) `windows` global windows after `position`."""
        epoch, window = position[0], position[1] + windows
        while window >= self.num_windows(epoch):
            window -= self.num_windows(epoch)
            epoch += 1
        return epoch, window

    def __iter__(self):
        worker = get_worker_info()
        worker_id, n_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        cache = self._chunk_cache()
        offset = self._taken * self.world_size  # global windows since self._start
        epoch, window = self.advance(self._start, offset)
        stream = np.empty((self.block_windows + 1) * (self.seq_len + 1), dtype=np.uint32)  # reused
        block = self.block_windows * self.world_size  # global windows: about block_windows of this rank's
        L = self.seq_len
        while True:
            stop = min(window + block, self.num_windows(epoch))
            if cache.files is not None:  # this block's chunks, then the next block's, in the background
                self._prefetch(cache, epoch, window, stop - window)
                self._prefetch(cache, *self.advance((epoch, window), stop - window), block)
            if window >= self.num_windows(epoch) // 2:  # half a pass to build the next one in
                self._plan_ahead(epoch + 1)
            mine = np.flatnonzero(self._is_mine(offset + np.arange(stop - window), worker_id, n_workers))
            breaks = np.flatnonzero(np.diff(mine) > 1) + 1  # this rank's runs of consecutive windows
            run_firsts = (window + mine[np.r_[0, breaks]]) * L if len(mine) else mine
            run_sizes = np.diff(np.r_[0, breaks, len(mine)])
            group, count = 0, 1  # 1, 2, 4, ... PACK_RUNS runs: the first window comes at once
            while group < len(run_firsts):
                sizes = run_sizes[group: group + count]
                spans = sizes * L + 1
                pack(self.pass_plan(epoch), run_firsts[group: group + count], spans, stream, cache)
                group, count = group + count, min(2 * count, PACK_RUNS)
                at = 0
                for size, span in zip(sizes.tolist(), spans.tolist()):
                    for row in range(size):
                        self._taken += 1
                        yield torch.from_numpy(stream[at + row * L: at + row * L + L + 1].astype(np.int64))
                    at += span
            offset += stop - window
            epoch, window = self.advance((epoch, window), stop - window)

    def _chunk_cache(self) -> ChunkCache:
        return ChunkCache(self.chunk_paths, self.chunk_sizes, self.cache_chunks, self.chunk_files, self.chunk_meta,
                          shared=self.plan_cache if self.world_size > 1 else None)

    def _prefetch(self, cache: ChunkCache, epoch: int, window: int, windows: int) -> None:
        plan = self.pass_plan(epoch)
        first = window * self.seq_len
        cache.prefetch(plan_chunks(plan, first, first + windows * self.seq_len + 1))

    def _chunk_file(self, chunk: int):
        return chunk_file(self.chunk_paths, self.chunk_files, self.chunk_meta, chunk)

    def _is_mine(self, offsets: np.ndarray, worker_id: int, n_workers: int) -> np.ndarray:
        """Which global windows (by offset from the start) this rank's worker yields."""
        local = offsets // self.world_size
        return (offsets % self.world_size == self.rank) & (
            (local // self.batch_size) % n_workers == worker_id)

    def state_dict(self, consumed: int | None = None) -> dict:
        """Where the stream stands once this rank has taken `consumed` windows since the
        start or the last `load_state_dict` (default: what this object's own iterator
        handed out; pass the count when DataLoader workers did the iterating). Every rank
        returns the same state, valid for any world size.
        """
        consumed = self._taken if consumed is None else consumed
        epoch, window = self.advance(self._start, consumed * self.world_size)
        return {"version": STATE_VERSION, "mixture": self.mixture["fingerprint"],
                "seed": self.seed, "seq_len": self.seq_len, "split": self.split,
                "epoch": epoch, "window": window, "windows": self.windows_consumed(consumed)}

    def windows_consumed(self, consumed: int | None = None) -> int:
        """The global number of the next window no rank has consumed (`state_dict()["windows"]`),
        once this rank has taken `consumed` windows (default: what its iterator handed out)."""
        consumed = self._taken if consumed is None else consumed
        return self._start_windows + consumed * self.world_size

    def load_state_dict(self, state: dict) -> None:
        expected = {"version": STATE_VERSION, "mixture": self.mixture["fingerprint"],
                    "seed": self.seed, "seq_len": self.seq_len, "split": self.split}
        for key, value in expected.items():
            if state.get(key) != value:
                raise BluesError(f"loader state has {key} = {state.get(key)!r}, this loader "
                                 f"{value!r}: resume with the same mixture, seed and seq_len")
        self._start = self.advance((int(state["epoch"]), 0), int(state["window"]))
        self._start_windows = int(state["windows"])
        self._taken = 0


    # Lineage: global window numbers <-> documents. Windows are numbered from the start of
    # pass 0, whatever this object's own start position.

    def window_position(self, window: int) -> tuple[int, int]:
        """(pass, window in the pass) of global window `window`."""
        if window < 0:
            raise BluesError(f"window {window}: global window numbers start at 0")
        return self.advance((0, 0), window)

    def window_pieces(self, window: int) -> list[WindowPiece]:
        """The document pieces global window `window` holds, in window order (no I/O)."""
        epoch, in_pass = self.window_position(window)
        plan = self.pass_plan(epoch)
        first, end = in_pass * self.seq_len, (in_pass + 1) * self.seq_len + 1
        lo = int(np.searchsorted(plan.packed_start, first, side="right")) - 1
        hi = int(np.searchsorted(plan.packed_start, end, side="left"))
        pieces = []
        for k in range(lo, hi):
            packed, length = int(plan.packed_start[k]), int(plan.length[k])
            a, b = max(packed, first), min(packed + length, end)
            if a < b:  # else only the piece's closing EOT is in the window
                pieces.append(self._piece(plan, k, a - packed, b - packed, a - first))
        return pieces

    def window_tokens(self, window: int) -> np.ndarray:
        """The `seq_len + 1` tokens of global window `window` (uint32), as training saw them."""
        epoch, in_pass = self.window_position(window)
        if self._lookup_cache is None:
            self._lookup_cache = self._chunk_cache()
        out = np.empty(self.seq_len + 1, dtype=np.uint32)
        pack(self.pass_plan(epoch), np.array([in_pass * self.seq_len]), np.array([len(out)]), out, self._lookup_cache)
        return out

    def document_ids(self, documents) -> list[DocumentId]:
        """Who the documents are, given as (source, chunk, row) keys (or WindowPieces), from
        their chunks' document index."""
        ids = []
        for key in documents:
            source, chunk, row = key.document if isinstance(key, WindowPiece) else key
            record = self._chunk_index(chunk)[row]
            raw_file = self.chunks.manifest(source)["sources"][int(record["source"])]
            ids.append(DocumentId(str(self.mixture["sources"][source]["path"]), raw_file["path"],
                                  raw_file["sha256"], int(record["index"])))
        return ids

    def _chunk_index(self, chunk: int) -> np.ndarray:
        return chunk_index(self.mixture, self.chunks, self.chunk_files, chunk)

    def find_document(self, source_file: str, index: int) -> tuple[int, int, int]:
        """The (source, chunk, row) key of record `index` of raw file `source_file` (its label in
        a store manifest, or its sha256 or a prefix of 8+ hex digits of it), from the document
        index of that store's chunks. BluesError when no store of the mixture has such a
        document, or the name fits raw files of several stores."""
        matches = []
        for i in range(len(self.mixture["sources"])):
            for position, s in enumerate(self.chunks.manifest(i)["sources"]):
                by_hash = len(source_file) >= 8 and s["sha256"].startswith(source_file.lower())
                if s["path"] == source_file or by_hash:
                    matches.append((i, position, s["path"]))
        if not matches:
            raise BluesError(f"{source_file}: no raw file of that name (or sha256) in the mixture's "
                             "stores; give the path as `blues verify` or manifest.json sources[].path lists it")
        if len(matches) > 1:
            named = ", ".join(f"{self.mixture['sources'][i]['path']}: {label}" for i, _, label in matches[:3])
            raise BluesError(f"{source_file}: fits {len(matches)} raw files ({named}); give more of the sha256")
        source, position, label = matches[0]
        bounds = self.chunks.bounds
        for chunk in range(bounds[source], bounds[source + 1]):
            records = self._chunk_index(chunk)
            rows = np.flatnonzero((records["index"] == index) & (records["source"] == position))
            if len(rows):
                return source, chunk, int(rows[0])
        raise BluesError(f"{label}:{index}: {self.mixture['sources'][source]['path']} holds no record {index} "
                         f"of {label} (it was skipped when prepared, or the file has fewer records)")

    def _document(self, document: tuple[int, int, int]) -> int | None:
        """The number of `document` (a (source, chunk, row) key) in the split's document table,
        or None when it is not in this split (held out by the validation rule, or empty)."""
        source, chunk, row = document
        src = self.sources[source]
        lo, hi = np.searchsorted(src.chunk, chunk, side="left"), np.searchsorted(src.chunk, chunk, side="right")
        found = int(lo + np.searchsorted(src.row[lo:hi], row))
        return src.first + found if found < hi and int(src.row[found]) == row else None

    def document_length(self, document: tuple[int, int, int]) -> int | None:
        """Tokens of `document` (a (source, chunk, row) key), or None when it is not in this
        split (held out by the validation rule, or empty)."""
        doc = self._document(document)
        return None if doc is None else int(self.documents[doc, DOCUMENT["length"]])

    def document_windows(self, document: tuple[int, int, int], end_window: int) -> list[DocumentWindow]:
        """Every global window before `end_window` that holds part of `document` (a (source,
        chunk, row) key), with the tokens it holds, in window order."""
        doc = self._document(document)
        if doc is None:
            return []
        doc_start = int(self.documents[doc, DOCUMENT["start"]])
        hits, epoch, offset, L = [], 0, 0, self.seq_len
        while offset < end_window:
            plan, n = self.pass_plan(epoch), self.num_windows(epoch)
            for k in np.flatnonzero(plan.doc == doc).tolist():
                packed, length = int(plan.packed_start[k]), int(plan.length[k])
                skip = int(plan.start[k]) - doc_start
                # window w holds packed positions [w L, w L + L]
                for w in range(max(0, -(-packed // L) - 1), min(n - 1, (packed + length - 1) // L) + 1):
                    if offset + w >= end_window:
                        break
                    a, b = max(packed, w * L), min(packed + length, w * L + L + 1)
                    hits.append(DocumentWindow(offset + w, epoch, w, skip + a - packed, skip + b - packed,
                                               a - w * L, b - w * L))
            offset += n
            epoch += 1
        return sorted(hits, key=lambda h: (h.window, h.window_start))

    def _piece(self, plan: Pass, k: int, skip: int, stop: int, window_start: int) -> WindowPiece:
        """Piece k of the plan, its tokens [skip, stop) (of the piece) at `window_start`."""
        chunk, row, start, length = self.documents[int(plan.doc[k])].tolist()
        offset = int(plan.start[k]) - start
        return WindowPiece(plan.source(k), chunk, row, offset + skip, offset + stop,
                           length, window_start, window_start + stop - skip)


def check_arguments(seq_len, rank, world_size, split, batch_size) -> None:
    if split not in SPLITS:
        raise BluesError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if seq_len < 1 or batch_size < 1:
        raise BluesError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
    if not 0 <= rank < world_size:
        raise BluesError(f"rank {rank} is outside world_size {world_size}")


def check_sources(per_pass: list[int], tokens: list[int], mixture: dict, split: str) -> None:
    """Every source with a share must have documents in the split to give it."""
    for share, count, entry in zip(per_pass, tokens, mixture["sources"]):
        if share > 0 and count == 0:
            raise BluesError(f"{entry['path']}: no documents in the {split} split to give "
                             f"its share of the mixture; lower --val_fraction and merge again")
    if sum(per_pass) == 0:
        raise BluesError(f"the mixture's {split} split holds no documents")
