"""How `blues prepare` cuts its sources into work items, the same whatever runs them.

An item is consecutive pieces of consecutive sources (`sources.Piece`) holding about
ITEM_BYTES of input; a worker reads its item and writes its chunks. Which pieces make an
item depends only on the sources' sizes (and Parquet footers), never on the worker count,
so the store is the same for every executor and worker count.

What can be cut inside one file:
- JSONL: byte ranges of about ITEM_BYTES. A range's records are those that begin in it: its
  reader skips to the line break that ends the record begun before it and reads on past its
  end to finish its last record, so no byte is read twice for a record and nothing is read
  by the driver. Record numbers need the line breaks before a range: counted first, one task
  per range (`count_range`, a memchr pass, ~100x faster than tokenizing).
- CSV: byte ranges too. A quoted field may hold line breaks; by RFC 4180 a line break ends a
  record iff the `"` characters before it are even in number. So each range's task counts its
  quotes, its line breaks and (for either parity at its start) the line breaks outside quotes,
  and checks that every run of quotes stands where RFC 4180 allows one (`csv_counts`); the
  driver chains the parities from the file's start. A range then starts at the first record
  boundary at or after its first byte and ends at the first one at or after its last, and reads
  the header itself. A file whose quotes break the rule (a quote inside an unquoted field, text
  after a closing quote), or with a lone carriage return or a NUL byte, is read whole: there
  Python's csv reader, the reference, does not follow quote parity.
- Parquet: runs of row groups of about ITEM_BYTES compressed (the footer gives the sizes);
  a file written as one row group is one piece.
- JSONL.zst: whole files. A zstd frame can only be decompressed from its start; a file of
  one frame (what `zstd` writes by default) has one start. Files written as many frames
  (`zstd --block-size`, pzstd, the seekable format) could be cut at frames; not done yet.
- Text: a file is one document.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blues_train.data.sources import CsvState, Piece, Source, open_parquet
from blues_train.io import storage

ITEM_BYTES = 64 << 20
COUNT_BLOCK = 8 << 20
RANGED = ("jsonl", "csv")  # cut into byte ranges
SPLITTABLE = (*RANGED, "parquet")


def plan(runner, sources: list[Source], sizes: list[int], item_bytes: int = ITEM_BYTES) -> list[list[Piece]]:
    """The work items of `sources`, their byte ranges counted (as tasks of `runner`) and told
    where they stand in their files; a CSV file that cannot be cut at quote parity is whole."""
    items = plan_items(sources, sizes, item_bytes)
    ranges = ranges_to_count(items)
    counted = {ranges[n]: counts for n, counts in runner.run(count_range, [(piece,) for piece in ranges])}
    whole = whole_files(counted)
    if whole:
        items = plan_items(sources, sizes, item_bytes, whole)
    return with_positions(items, counted)


def plan_items(sources: list[Source], sizes: list[int], item_bytes: int = ITEM_BYTES,
               whole: frozenset[Source] = frozenset()) -> list[list[Piece]]:
    """The work items of `sources` (`sizes`: their bytes): consecutive pieces, about
    `item_bytes` of input each; the sources in `whole` are not cut."""
    items, current, held = [], [], 0
    for source, size in zip(sources, sizes):
        for piece, piece_bytes in _pieces(source, size, item_bytes if source not in whole else max(size, 1)):
            current.append(piece)
            held += piece_bytes
            if held >= item_bytes:
                items.append(current)
                current, held = [], 0
    if current:
        items.append(current)
    return items


def _pieces(source: Source, size: int, item_bytes: int) -> list[tuple[Piece, int]]:
    if source.skip or size <= item_bytes or source.fmt not in SPLITTABLE:
        return [(Piece(source), size)]
    if source.fmt in RANGED:
        cuts = list(range(0, size, item_bytes)) + [size]
        return [(Piece(source, start, end), end - start) for start, end in zip(cuts, cuts[1:])]
    return _row_group_pieces(source, item_bytes)


def _row_group_pieces(source: Source, item_bytes: int) -> list[tuple[Piece, int]]:
    with storage.open_input(source.path) as fh:
        metadata = open_parquet(fh, source).metadata
    sizes = [sum(metadata.row_group(g).column(c).total_compressed_size for c in range(metadata.num_columns))
             for g in range(metadata.num_row_groups)]
    pieces, start, held = [], 0, 0
    for group, group_bytes in enumerate(sizes):
        held += group_bytes
        if held >= item_bytes or group == len(sizes) - 1:
            pieces.append((Piece(source, start, group + 1), held))
            start, held = group + 1, 0
    return pieces or [(Piece(source), 0)]


def ranges_to_count(items: list[list[Piece]]) -> list[Piece]:
    """The byte ranges to count before reading: JSONL ranges but each file's last (nothing
    after it needs its line breaks), every CSV range (each is checked)."""
    ranged = [piece for item in items for piece in item if piece.end is not None and piece.source.fmt in RANGED]
    last = {piece.source: piece for piece in ranged}
    return [piece for piece in ranged if piece.source.fmt == "csv" or last[piece.source] is not piece]


def count_range(piece: Piece):
    """A task: the counts of a range that later ranges of its file need (it reads the range,
    locally or remotely): JSONL its line breaks, CSV its `CsvCounts`."""
    return csv_counts(piece) if piece.source.fmt == "csv" else count_newlines(piece)


def count_newlines(piece: Piece) -> int:
    """Line breaks in the piece's byte range."""
    count, left = 0, piece.end - piece.start
    with storage.open_input(piece.source.path) as fh:
        fh.seek(piece.start)
        while left > 0:
            block = fh.read(min(COUNT_BLOCK, left))
            if not block:
                break
            count += block.count(b"\n")
            left -= len(block)
    return count


@dataclass(frozen=True)
class CsvCounts:
    """A CSV byte range's quotes and line breaks; `records[q]` and `valid[q]`: its line breaks
    outside quotes, and whether its quotes follow RFC 4180, when the range starts inside quotes
    (q = 1) or not (q = 0)."""

    quotes: int
    newlines: int
    records: tuple[int, int]
    valid: tuple[bool, bool]


QUOTE, NEWLINE, CARRIAGE_RETURN, COMMA = 0x22, 0x0A, 0x0D, 0x2C
FIELD_EDGE = np.array([COMMA, NEWLINE, CARRIAGE_RETURN])
BOM = b"\xef\xbb\xbf"


def csv_counts(piece: Piece) -> CsvCounts:
    """The range's `CsvCounts`. Its bytes are read whole, with the byte before it and, to judge
    its last run of quotes, the bytes after it up to the end of that run and one more."""
    start, end = piece.start, piece.end
    first = max(start - 1, 0)
    with storage.open_input(piece.source.path) as fh:
        fh.seek(first)
        data = fh.read(end - first)
        more = fh.read(1)
        while more == b'"':
            data, more = data + more, fh.read(1)
        data += more
    array = np.frombuffer(data, dtype=np.uint8)
    before = start - first
    own = array[before: before + end - start]
    all_quotes = np.flatnonzero(array == QUOTE)  # positions in `array`
    quotes = all_quotes[np.searchsorted(all_quotes, before): np.searchsorted(all_quotes, before + end - start)]
    newlines = np.flatnonzero(own == NEWLINE) + before
    inside_before_newline = np.searchsorted(quotes, newlines) % 2  # quotes before each break, mod 2
    records = tuple(int(np.count_nonzero(inside_before_newline == q)) for q in (0, 1))
    if data.find(b"\r", before, before + end - start) >= 0:
        returns = np.flatnonzero(own == CARRIAGE_RETURN) + before + 1  # the byte after each, maybe past the data
        follows = returns < len(array)
        lone_return = not np.all(follows) or np.any(array[returns[follows]] != NEWLINE)  # a record ends there
    else:
        lone_return = False
    if lone_return or data.find(b"\0", before, before + end - start) >= 0:
        return CsvCounts(len(quotes), len(newlines), records, (False, False))
    head = len(BOM) if start == 0 and data.startswith(BOM) else 0  # the byte-order mark precedes the first field
    valid = tuple(_quotes_valid(array, all_quotes, before, end - start, head, q) for q in (0, 1))
    return CsvCounts(len(quotes), len(newlines), records, valid)


def _quotes_valid(array: np.ndarray, quotes: np.ndarray, before: int, length: int, head: int, inside: int) -> bool:
    """Whether every run of quotes that begins in the range (`array[before: before + length]`;
    the bytes after it let a run finish; `quotes`: the positions of `array`'s quotes) stands
    where RFC 4180 allows one, the range starting inside quotes iff `inside`: outside quotes a
    run opens a field (after a field's edge) and, if even, closes it too (before an edge);
    inside, an odd run closes the field (before an edge), an even one is escaped quotes."""
    if not len(quotes):
        return True
    firsts = np.concatenate([[0], np.flatnonzero(np.diff(quotes) != 1) + 1])
    lengths = np.diff(np.concatenate([firsts, [len(quotes)]]))
    starts, ends = quotes[firsts], quotes[firsts] + lengths  # a run's first byte, the byte after it
    own = (starts >= before) & (starts < before + length)
    if before and array[before - 1] == QUOTE:  # the run at the range's start began before it
        own &= starts != before
    if not np.any(own):
        return True
    starts, ends, lengths = starts[own], ends[own], lengths[own]
    own_quotes_before = np.searchsorted(quotes, starts) - np.searchsorted(quotes, before)
    inside_at = (inside + own_quotes_before) % 2
    previous = np.where(starts > 0, array[np.maximum(starts - 1, 0)], NEWLINE)
    at_edge_before = np.isin(previous, FIELD_EDGE) | (starts == head)
    following = array[np.minimum(ends, len(array) - 1)]
    at_edge_after = np.isin(following, FIELD_EDGE) | (ends >= len(array))  # the end of the file is an edge
    closes = np.where(inside_at == 0, lengths % 2 == 0, lengths % 2 == 1)
    return bool(np.all(((inside_at == 1) | at_edge_before) & (~closes | at_edge_after)))


def whole_files(counted: dict[Piece, object]) -> frozenset[Source]:
    """The CSV files that some range's quotes show are not RFC 4180: they are read whole."""
    broken, inside = set(), {}
    for piece in sorted((p for p in counted if p.source.fmt == "csv"), key=lambda p: (p.source.label, p.start)):
        counts = counted[piece]
        state = inside.get(piece.source, 0)
        if not counts.valid[state]:
            broken.add(piece.source)
        inside[piece.source] = (state + counts.quotes) % 2
    return frozenset(broken)


def with_positions(items: list[list[Piece]], counted: dict[Piece, object]) -> list[list[Piece]]:
    """The items, each JSONL range knowing the line breaks before it, each CSV range the state
    of the file at its start and end (`counted`: per range)."""
    before: dict[Source, CsvState] = {}
    numbered = []
    for item in items:
        pieces = []
        for piece in item:
            if piece.end is not None and piece.source.fmt in RANGED:
                state = before.get(piece.source, CsvState())
                after = _advance(state, counted.get(Piece(piece.source, piece.start, piece.end)))
                piece = Piece(piece.source, piece.start, piece.end, state.newlines,
                              state if piece.source.fmt == "csv" else None, after.inside)
                before[piece.source] = after
            pieces.append(piece)
        numbered.append(pieces)
    return numbered


def _advance(state: CsvState, counts) -> CsvState:
    if counts is None:  # a JSONL file's last range
        return state
    if isinstance(counts, int):
        return CsvState(state.newlines + counts)
    return CsvState(state.newlines + counts.newlines, state.records + counts.records[state.inside],
                    (state.inside + counts.quotes) % 2)
