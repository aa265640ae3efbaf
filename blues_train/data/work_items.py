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
  per range (`count_newlines`, a memchr pass, ~100x faster than tokenizing).
- Parquet: runs of row groups of about ITEM_BYTES compressed (the footer gives the sizes);
  a file written as one row group is one piece.
- CSV: whole files. A quoted field may hold line breaks, and from an arbitrary byte no reader
  can tell whether it is inside quotes without reading from the start of the file.
- JSONL.zst: whole files. A zstd frame can only be decompressed from its start; a file of
  one frame (what `zstd` writes by default) has one start. Files written as many frames
  (`zstd --block-size`, pzstd, the seekable format) could be cut at frames; not done yet.
- Text: a file is one document.
"""

from __future__ import annotations

from blues_train.data.sources import Piece, Source, open_parquet
from blues_train.io import storage

ITEM_BYTES = 64 << 20
COUNT_BLOCK = 8 << 20
SPLITTABLE = ("jsonl", "parquet")


def plan_items(sources: list[Source], sizes: list[int], item_bytes: int = ITEM_BYTES) -> list[list[Piece]]:
    """The work items of `sources` (`sizes`: their bytes): consecutive pieces, about
    `item_bytes` of input each."""
    items, current, held = [], [], 0
    for source, size in zip(sources, sizes):
        for piece, piece_bytes in _pieces(source, size, item_bytes):
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
    if source.fmt == "jsonl":
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
    """The JSONL ranges whose line breaks later ranges of their file need: all but each file's last."""
    ranged = [piece for item in items for piece in item if piece.end is not None and piece.source.fmt == "jsonl"]
    last = {piece.source: piece for piece in ranged}
    return [piece for piece in ranged if last[piece.source] is not piece]


def count_newlines(piece: Piece) -> int:
    """Line breaks in the piece's byte range (a task: it reads the range, locally or remotely)."""
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


def with_line_numbers(items: list[list[Piece]], counted: dict[Piece, int]) -> list[list[Piece]]:
    """The items, each JSONL range knowing the line breaks before it (`counted`: per range)."""
    before: dict[Source, int] = {}
    numbered = []
    for item in items:
        pieces = []
        for piece in item:
            if piece.end is not None and piece.source.fmt == "jsonl":
                so_far = before.get(piece.source, 0)
                piece = Piece(piece.source, piece.start, piece.end, so_far)
                before[piece.source] = so_far + counted.get(Piece(piece.source, piece.start, piece.end), 0)
            pieces.append(piece)
        numbered.append(pieces)
    return numbered

