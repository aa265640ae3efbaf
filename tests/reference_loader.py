"""Frozen copy of blues_train/mixture/loader.py before the document index (issue 24): the stream the
indexed loader must reproduce byte for byte. Do not edit; it is the reference.

Packed training windows from a mixture: deterministic, rank-sharded, exactly resumable.

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
`document_ids` names them (raw file, sha256, index in the file) reading only the `source`
and `index` columns of the chunks involved; `document_windows` answers the reverse
question. `blues lineage` (blues_train/serving/lineage.py) is built on these.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from blues_train.data import store
from blues_train.data.tokenizer import EOT_ID
from blues_train.io import storage
from blues_train.io.chunk_files import ChunkFiles
from blues_train.io.errors import BluesError
from blues_train.mixture.spec import held_out, read_mixture, source_manifest

SPLITS = ("train", "val")
STATE_VERSION = 1
BLOCK_TOKENS = 1 << 20  # windows are cut from the packed stream about this many at a time
IDENTITY_CHUNKS = 64  # chunks whose source and index columns lineage lookups keep


@dataclass
class Source:
    """One source's documents of the split: where each one's tokens are, and how many."""

    chunk: np.ndarray  # int32: index into the mixture's chunk list
    start: np.ndarray  # int64: offset of the document's first token in its chunk
    length: np.ndarray  # int64: tokens (> 0)
    row: np.ndarray  # int32: the document's row in its chunk
    per_pass: int  # tokens this source contributes to each pass

    @property
    def tokens(self) -> int:
        return int(self.length.sum())


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
    """One pass of the mixture as pieces of documents, in stream order."""

    chunk: np.ndarray
    start: np.ndarray
    length: np.ndarray
    source: np.ndarray
    packed_start: np.ndarray  # position of each piece in the packed stream (EOTs included)
    n_windows: int


class ChunkCache:
    """The decompressed tokens of the most recently used chunks, at most `capacity`.

    Remote chunks (`paths` entries that are `storage.RemotePath`s) are read from their local
    copies in `files` (a `ChunkFiles`), given each chunk's (sha256, bytes) in `chunks`.
    """

    def __init__(self, paths: list, n_tokens: list[int], capacity: int, files: ChunkFiles | None = None,
                 chunks: list | None = None):
        self.paths, self.n_tokens, self.capacity = paths, n_tokens, capacity
        self.files, self.chunks = files, chunks
        self.tokens: OrderedDict[int, np.ndarray] = OrderedDict()

    def local_path(self, chunk: int):
        """Where chunk `chunk` is read from: its own path, or its local copy."""
        return chunk_file(self.paths, self.files, self.chunks, chunk)

    def prefetch(self, chunks) -> None:
        """Fetch these chunks' objects ahead, in the background (remote chunks only)."""
        if self.files is not None:
            self.files.prefetch((self.paths[c], *self.chunks[c]) for c in chunks
                                if c not in self.tokens and isinstance(self.paths[c], storage.RemotePath))

    def get(self, chunk: int) -> np.ndarray:
        if chunk in self.tokens:
            self.tokens.move_to_end(chunk)
            return self.tokens[chunk]
        tokens = chunk_tokens(store.read_chunk(self.local_path(chunk)))
        if len(tokens) != self.n_tokens[chunk]:
            raise BluesError(
                f"{self.paths[chunk]}: holds {len(tokens)} tokens, the manifest says "
                f"{self.n_tokens[chunk]}; it changed while training: run `blues verify`"
            )
        self.tokens[chunk] = tokens
        if len(self.tokens) > self.capacity:
            self.tokens.popitem(last=False)
        return tokens


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
    return list(dict.fromkeys(plan.chunk[lo:hi].tolist()))


def chunk_tokens(table: pa.Table) -> np.ndarray:
    """All tokens of a chunk table, documents concatenated, as one uint32 array."""
    parts = [batch.values.to_numpy() for batch in table.column("tokens").chunks]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def chunk_offsets(table: pa.Table) -> np.ndarray:
    """Start of each document in `chunk_tokens(table)`, plus the end: int64, len n_docs+1."""
    ends = np.cumsum(store.doc_lengths(table), dtype=np.int64)
    return np.concatenate([[0], ends])


def chunk_identity(path) -> tuple[list[str], np.ndarray]:
    """The `source` and `index` columns of a chunk (one entry per row), reading nothing else."""
    try:
        with pa.memory_map(str(path)) as file:
            schema = pa.ipc.open_file(file).schema
            fields = [schema.get_field_index(name) for name in ("source", "index")]
            if min(fields) < 0:
                raise BluesError(f"{path}: has no source and index columns; run `blues verify`")
            options = pa.ipc.IpcReadOptions(included_fields=fields)
            table = pa.ipc.open_file(file, options=options).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise BluesError(f"{path}: not a readable Arrow chunk ({exc}); run `blues verify`") from None
    return table.column("source").to_pylist(), table.column("index").to_numpy()


def load_sources(mixture: dict, split: str, files: ChunkFiles | None = None):
    """The split's documents of every source, and the mixture's chunk paths, sizes in tokens
    and (sha256, bytes). Remote chunks are read through `files` (default: a ChunkFiles in
    the default cache folder), fetched a few ahead in parallel."""
    fraction = mixture["validation"]["fraction"]
    manifests = [source_manifest(entry) for entry in mixture["sources"]]
    listed = [(store.chunk_path(entry["path"], chunk), chunk)
              for entry, manifest in zip(mixture["sources"], manifests) for chunk in manifest["chunks"]]
    paths = [path for path, _ in listed]
    chunks = [(chunk["sha256"], chunk["bytes"]) for _, chunk in listed]
    if files is None and any(isinstance(p, storage.RemotePath) for p in paths):
        files = ChunkFiles()
    ahead = 2 * (files.threads if files is not None else 0)
    sources, n_tokens = [], []
    for entry, manifest in zip(mixture["sources"], manifests):
        parts = []
        for chunk in manifest["chunks"]:
            number = len(n_tokens)
            if files is not None:  # the next few download while this one is read
                files.prefetch((paths[c], *chunks[c]) for c in range(number, min(number + ahead, len(paths)))
                               if isinstance(paths[c], storage.RemotePath))
            path = chunk_file(paths, files, chunks, number)
            parts.append(chunk_documents(path, manifest, number, fraction, split))
            n_tokens.append(chunk["n_tokens"])
        chunk_ids, starts, lengths, rows = (np.concatenate(p) for p in zip(*parts))
        sources.append(Source(chunk_ids, starts, lengths, rows, per_pass=entry["tokens"]))
    if split == "val":  # every held-out document once, of the sources the mixture trains on
        for source, entry in zip(sources, mixture["sources"]):
            source.per_pass = source.tokens if entry["tokens"] > 0 else 0
    return sources, paths, n_tokens, chunks


def chunk_documents(path, manifest: dict, chunk_id: int, fraction: float, split: str):
    """(chunk ids, token offsets, lengths, rows) of the non-empty documents of `split` in a chunk."""
    table = store.read_chunk(path)
    offsets = chunk_offsets(table)
    lengths = np.diff(offsets)
    keep = (lengths > 0) & (validation_mask(table, manifest, fraction) == (split == "val"))
    starts = offsets[:-1][keep]
    rows = np.flatnonzero(keep).astype(np.int32)
    return np.full(len(starts), chunk_id, dtype=np.int32), starts, lengths[keep], rows


def validation_mask(table: pa.Table, manifest: dict, fraction: float) -> np.ndarray:
    """Which rows of a chunk the mixture's validation rule holds out."""
    sha_by_label = {s["path"]: s["sha256"] for s in manifest["sources"]}
    labels = table.column("source").combine_chunks().dictionary_encode()
    indices = table.column("index").to_numpy()
    mask = np.zeros(len(indices), dtype=bool)
    codes = labels.indices.to_numpy(zero_copy_only=False)
    for code, label in enumerate(labels.dictionary.to_pylist()):
        rows = codes == code
        mask[rows] = held_out(sha_by_label[label], indices[rows], fraction)
    return mask


def stream_seeds(mixture: dict, seed: int, split: str) -> list[int]:
    """What a stream's order is drawn from, before the source and epoch numbers."""
    return [mixture["seed"], seed, SPLITS.index(split)]


def epoch_order(source: Source, rng: np.random.Generator) -> np.ndarray:
    """A permutation of the source's documents: chunks shuffled, documents within each."""
    chunk_ids, local = np.unique(source.chunk, return_inverse=True)
    chunk_rank = rng.permutation(len(chunk_ids))
    return np.lexsort((rng.random(len(source.chunk)), chunk_rank[local]))


def source_pieces(source: Source, seeds: list[int], first: int, end: int):
    """Pieces of the source stream's tokens [first, end): (doc indices, offsets, lengths)."""
    per_epoch = source.tokens
    docs, offsets, lengths = [], [], []
    for epoch in range(first // per_epoch, (end - 1) // per_epoch + 1):
        order = epoch_order(source, np.random.default_rng([*seeds, epoch]))
        doc_end = epoch * per_epoch + np.cumsum(source.length[order])
        doc_start = doc_end - source.length[order]
        inside = (doc_end > first) & (doc_start < end)
        cut_start = np.maximum(doc_start[inside], first)
        docs.append(order[inside])
        offsets.append(cut_start - doc_start[inside])
        lengths.append(np.minimum(doc_end[inside], end) - cut_start)
    return np.concatenate(docs), np.concatenate(offsets), np.concatenate(lengths)


def build_pass(sources: list[Source], seeds: list[int], epoch: int, seq_len: int) -> Pass:
    """Pass `epoch`: every source's share, interleaved by progress, cut into windows."""
    chunk, start, length, source_id, progress = [], [], [], [], []
    for i, source in enumerate(sources):
        if source.per_pass == 0:
            continue
        first = epoch * source.per_pass
        docs, offsets, lengths = source_pieces(source, [*seeds, i], first, first + source.per_pass)
        chunk.append(source.chunk[docs])
        start.append(source.start[docs] + offsets)
        length.append(lengths)
        source_id.append(np.full(len(docs), i, dtype=np.int16))
        position = np.cumsum(lengths) - lengths
        progress.append((position + lengths / 2) / source.per_pass)
    order = np.argsort(np.concatenate(progress), kind="stable")
    length = np.concatenate(length)[order]
    packed_end = np.cumsum(length + 1)
    return Pass(
        chunk=np.concatenate(chunk)[order],
        start=np.concatenate(start)[order],
        length=length,
        source=np.concatenate(source_id)[order],
        packed_start=packed_end - (length + 1),
        n_windows=max(int(packed_end[-1]) - 1, 0) // seq_len,
    )


def realized_shares(mixture: dict, split: str = "train") -> tuple[list[float], list[int]]:
    """Each source's share of the tokens of pass 0 as this loader builds it, and each
    source's tokens in `split` (what `blues verify` and the merged_dataset asset report)."""
    sources, *_ = load_sources(mixture, split)
    check_sources(sources, mixture, split)
    plan = build_pass(sources, stream_seeds(mixture, 0, split), 0, seq_len=1)
    realized = np.bincount(plan.source, weights=plan.length, minlength=len(sources))
    return (realized / realized.sum()).tolist(), [source.tokens for source in sources]


def pack(plan: Pass, first: int, out: np.ndarray, cache: ChunkCache) -> None:
    """Fill `out` with the pass's packed stream (documents joined by EOT) from token `first`."""
    end = first + len(out)
    lo = int(np.searchsorted(plan.packed_start, first, side="right")) - 1
    hi = int(np.searchsorted(plan.packed_start, end, side="left"))
    pieces = zip(plan.packed_start[lo:hi].tolist(), plan.chunk[lo:hi].tolist(),
                 plan.start[lo:hi].tolist(), plan.length[lo:hi].tolist())
    pos = first
    for packed, chunk, start, length in pieces:
        skip = pos - packed
        if skip < length:
            take = min(length - skip, end - pos)
            out[pos - first: pos - first + take] = cache.get(chunk)[start + skip: start + skip + take]
            pos += take
        if pos < end:
            out[pos - first] = EOT_ID
            pos += 1


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
                 chunk_files: ChunkFiles | None = None):
        check_arguments(seq_len, rank, world_size, split, batch_size)
        self.mixture = read_mixture(mixture_dir)
        if split == "val" and self.mixture["validation"]["fraction"] == 0:
            raise BluesError(f"{mixture_dir}: the mixture holds out no validation documents "
                             "(val_fraction 0); merge again with --val_fraction > 0")
        self.seq_len, self.seed, self.split = seq_len, seed, split
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        remote = storage.is_remote(mixture_dir) or any(storage.is_remote(s["path"]) for s in self.mixture["sources"])
        self.chunk_files = chunk_files or (ChunkFiles(chunk_cache_dir, chunk_cache_bytes) if remote else None)
        self.sources, self.chunk_paths, self.chunk_sizes, self.chunk_meta = load_sources(
            self.mixture, split, self.chunk_files)
        check_sources(self.sources, self.mixture, split)
        self.cache_chunks = cache_chunks or 2 * len(self.sources) + 2
        self.block_windows = max(1, BLOCK_TOKENS // seq_len)
        self.seeds = stream_seeds(self.mixture, seed, split)
        self._plans: OrderedDict[int, Pass] = OrderedDict()
        self._n_windows: dict[int, int] = {}
        self._start, self._start_windows = (0, 0), 0  # where this run began (or resumed)
        self._taken = 0  # windows this rank's own iterator handed out since then
        self._lookup_cache: ChunkCache | None = None  # lineage lookups (window_tokens)
        self._identity: OrderedDict[int, tuple[list[str], np.ndarray]] = OrderedDict()  # chunk -> columns
        self._source_sha: dict[int, dict[str, str]] = {}  # mixture source -> raw file label -> sha256
        if self.num_windows(0) == 0:
            raise BluesError(f"{mixture_dir}: one pass of the {split} split is shorter than "
                             f"one window of seq_len + 1 = {seq_len + 1} tokens")

    def pass_plan(self, epoch: int) -> Pass:
        """Pass `epoch`'s plan; the two most recently used are kept."""
        if epoch in self._plans:
            self._plans.move_to_end(epoch)
        else:
            self._plans[epoch] = build_pass(self.sources, self.seeds, epoch, self.seq_len)
            self._n_windows[epoch] = self._plans[epoch].n_windows
            while len(self._plans) > 2:
                self._plans.popitem(last=False)
        return self._plans[epoch]

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
        stream = np.empty(self.block_windows * self.seq_len + 1, dtype=np.uint32)  # reused
        while True:
            stop = min(window + self.block_windows, self.num_windows(epoch))
            if cache.files is not None:  # this block's chunks, then the next block's, in the background
                self._prefetch(cache, epoch, window, stop - window)
                self._prefetch(cache, *self.advance((epoch, window), stop - window), self.block_windows)
            mine = np.flatnonzero(self._is_mine(offset + np.arange(stop - window), worker_id, n_workers))
            if len(mine):
                first = (window + mine[0]) * self.seq_len
                span = (mine[-1] - mine[0]) * self.seq_len + self.seq_len + 1
                pack(self.pass_plan(epoch), first, stream[:span], cache)
                for row in (mine - mine[0]).tolist():
                    self._taken += 1
                    start = row * self.seq_len
                    yield torch.from_numpy(stream[start: start + self.seq_len + 1].astype(np.int64))
            offset += stop - window
            epoch, window = self.advance((epoch, window), stop - window)

    def _chunk_cache(self) -> ChunkCache:
        return ChunkCache(self.chunk_paths, self.chunk_sizes, self.cache_chunks, self.chunk_files, self.chunk_meta)

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
        pack(self.pass_plan(epoch), in_pass * self.seq_len, out, self._lookup_cache)
        return out

    def document_ids(self, documents) -> list[DocumentId]:
        """Who the documents are, given as (source, chunk, row) keys (or WindowPieces): reads
        the `source` and `index` columns of their chunks only (each chunk once)."""
        ids = []
        for key in documents:
            source, chunk, row = key.document if isinstance(key, WindowPiece) else key
            if chunk not in self._identity:
                self._identity[chunk] = chunk_identity(self._chunk_file(chunk))
                while len(self._identity) > IDENTITY_CHUNKS:
                    self._identity.popitem(last=False)
            self._identity.move_to_end(chunk)
            labels, indices = self._identity[chunk]
            entry = self.mixture["sources"][source]
            if source not in self._source_sha:
                manifest = store.read_manifest(entry["path"])
                self._source_sha[source] = {s["path"]: s["sha256"] for s in manifest["sources"]}
            label = labels[row]
            ids.append(DocumentId(str(entry["path"]), label, self._source_sha[source].get(label, ""),
                                  int(indices[row])))
        return ids

    def find_document(self, source_file: str, index: int) -> tuple[int, int, int]:
        """The (source, chunk, row) key of record `index` of raw file `source_file` (its label in
        a store manifest, or its sha256 or a prefix of 8+ hex digits of it), reading only the
        `source` and `index` columns of that store's chunks. BluesError when no store of the
        mixture has such a document, or the name fits raw files of several stores."""
        matches = []
        for i, entry in enumerate(self.mixture["sources"]):
            for s in store.read_manifest(entry["path"])["sources"]:
                by_hash = len(source_file) >= 8 and s["sha256"].startswith(source_file.lower())
                if s["path"] == source_file or by_hash:
                    matches.append((i, s["path"]))
        if not matches:
            raise BluesError(f"{source_file}: no raw file of that name (or sha256) in the mixture's "
                             "stores; give the path as `blues verify` or manifest.json sources[].path lists it")
        if len(matches) > 1:
            named = ", ".join(f"{self.mixture['sources'][i]['path']}: {label}" for i, label in matches[:3])
            raise BluesError(f"{source_file}: fits {len(matches)} raw files ({named}); give more of the sha256")
        source, label = matches[0]
        entry = self.mixture["sources"][source]
        manifest = store.read_manifest(entry["path"])
        first_chunk = self.chunk_paths.index(store.chunk_path(entry["path"], manifest["chunks"][0]))
        for number in range(len(manifest["chunks"])):
            labels, indices = chunk_identity(self._chunk_file(first_chunk + number))
            rows = np.flatnonzero((indices == index) & (np.asarray(labels, dtype=object) == label))
            if len(rows):
                return source, first_chunk + number, int(rows[0])
        raise BluesError(f"{label}:{index}: {entry['path']} holds no record {index} of {label} "
                         "(it was skipped when prepared, or the file has fewer records)")

    def document_length(self, document: tuple[int, int, int]) -> int | None:
        """Tokens of `document` (a (source, chunk, row) key), or None when it is not in this
        split (held out by the validation rule, or empty)."""
        source, chunk, row = document
        src = self.sources[source]
        found = np.flatnonzero((src.chunk == chunk) & (src.row == row))
        return int(src.length[found[0]]) if len(found) else None

    def document_windows(self, document: tuple[int, int, int], end_window: int) -> list[DocumentWindow]:
        """Every global window before `end_window` that holds part of `document` (a (source,
        chunk, row) key), with the tokens it holds, in window order."""
        source, chunk, row = document
        src = self.sources[source]
        found = np.flatnonzero((src.chunk == chunk) & (src.row == row))
        if not len(found):
            return []
        doc_start, doc_length = int(src.start[found[0]]), int(src.length[found[0]])
        hits, epoch, offset, L = [], 0, 0, self.seq_len
        while offset < end_window:
            plan, n = self.pass_plan(epoch), self.num_windows(epoch)
            mine = np.flatnonzero((plan.source == source) & (plan.chunk == chunk) & (plan.start >= doc_start)
                                  & (plan.start < doc_start + doc_length))
            for k in mine.tolist():
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
        source, chunk, start = int(plan.source[k]), int(plan.chunk[k]), int(plan.start[k])
        src = self.sources[source]
        lo, hi = np.searchsorted(src.chunk, chunk, side="left"), np.searchsorted(src.chunk, chunk, side="right")
        doc = int(lo + np.searchsorted(src.start[lo:hi], start, side="right") - 1)
        offset = start - int(src.start[doc])
        return WindowPiece(source, chunk, int(src.row[doc]), offset + skip, offset + stop, int(src.length[doc]),
                           window_start, window_start + stop - skip)


def check_arguments(seq_len, rank, world_size, split, batch_size) -> None:
    if split not in SPLITS:
        raise BluesError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if seq_len < 1 or batch_size < 1:
        raise BluesError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
    if not 0 <= rank < world_size:
        raise BluesError(f"rank {rank} is outside world_size {world_size}")


def check_sources(sources: list[Source], mixture: dict, split: str) -> None:
    """Every source with a share must have documents in the split to give it."""
    for source, entry in zip(sources, mixture["sources"]):
        if source.per_pass > 0 and source.tokens == 0:
            raise BluesError(f"{entry['path']}: no documents in the {split} split to give "
                             f"its share of the mixture; lower --val_fraction and merge again")
    if sum(s.per_pass for s in sources) == 0:
        raise BluesError(f"the mixture's {split} split holds no documents")
