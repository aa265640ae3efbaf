"""Raw corpora -> documents: text folders, CSV, JSONL, JSONL.zst and Parquet.

Every reader streams (no file is decompressed to disk or whole into memory, except a
text file, which is one document) and yields `Document`s in file order. Bytes that are
not valid UTF-8 are decoded with `surrogateescape`, so `repair_text` can later turn
exactly those bytes into U+FFFD and count the document. Records that cannot be used
are skipped and recorded in a `SkipLog` with their file:line; the run goes on.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from blues_train.io import storage
from blues_train.io.errors import BluesError

FORMATS = ("text", "csv", "jsonl", "jsonl.zst", "parquet")
DEFAULT_GLOB = "**/*.txt"  # files taken from an input folder
EXTENSIONS = {
    ".jsonl.zst": "jsonl.zst",
    ".json.zst": "jsonl.zst",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
}
MAX_EXAMPLES = 5
BINARY_SNIFF_BYTES = 8192
BINARY_UNDECODABLE_SHARE = 0.3
PARQUET_BATCH_ROWS = 256
# Python's csv module refuses fields over 128 KiB by default; one document may be far larger.
CSV_FIELD_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Source:
    """One raw file: where it is, how to read it, and the name the store records."""

    path: Path  # or a storage.RemotePath
    fmt: str
    label: str
    real_path: str | None = None  # where a symlink in an input folder leads, if elsewhere
    skip: str | None = None  # why no record of this file can be used (a SkipLog reason)
    listed: tuple[int, str] | None = None  # an object's (size, ETag) as its listing gave them


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # Source.label
    index: int  # 0-based record number within the source (skipped records keep theirs)
    location: str  # "label:line" (Parquet: row number), for messages


@dataclass
class SkipLog:
    """Skipped records per reason, each with its first few file:line examples."""

    reasons: dict[str, dict] = field(default_factory=dict)
    missing_field_first: str | None = None

    def add(self, reason: str, location: str, count: int = 1) -> None:
        entry = self.reasons.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += count
        if len(entry["examples"]) < MAX_EXAMPLES:
            entry["examples"].append(location)

    def as_dict(self) -> dict:
        return {reason: dict(self.reasons[reason]) for reason in sorted(self.reasons)}


def format_of(path: Path, fmt: str | None) -> str | None:
    """The explicit format, else the one the file name's extension says (None: unknown)."""
    if fmt:
        return fmt
    name = path.name.lower()
    for ext, found in EXTENSIONS.items():
        if name.endswith(ext):
            return found
    return None


def discover_sources(inputs, fmt: str | None = None, glob: str = DEFAULT_GLOB) -> list[Source]:
    """The raw files behind `inputs` (files, or folders searched with `glob`), in order.

    Labels are paths relative to the folder that holds all inputs, so a corpus that moves
    keeps its labels (and the store its fingerprint). A symlink in an input folder is
    followed and labeled by its own location there.
    """
    if fmt is not None and fmt not in FORMATS:
        raise BluesError(f"unknown --format {fmt!r}: use one of {', '.join(FORMATS)}")
    if not inputs:
        raise BluesError("no input given: pass --input_dir DIR or --dataset FILE")
    given_paths = [storage.path(given) for given in inputs]
    remote = [isinstance(p, storage.RemotePath) for p in given_paths]
    if any(remote):
        return _remote_sources(given_paths, remote, fmt, glob)
    files: list[tuple[Path, Path, str]] = []
    for given in given_paths:
        files += _files_of(given, fmt, glob)
    root = Path(os.path.commonpath([given.resolve().parent for given in given_paths]))
    return [_source(path, located, found, root) for path, located, found in files]


def _remote_sources(given_paths: list, remote: list[bool], fmt: str | None, glob: str) -> list[Source]:
    """Sources of objects under URIs, labeled relative to the prefix that holds all inputs,
    as local inputs are: the same corpus in a bucket gives the same labels (and store)."""
    if not all(remote) or len({(p.scheme, p.bucket) for p in given_paths}) > 1:
        raise BluesError("inputs mix local paths and URIs, or several buckets: give inputs of one "
                         "kind, in one bucket (copy the others there)")
    files = []
    for given in given_paths:
        files += _remote_files_of(given, fmt, glob)
    parents = [given.parent.key if "/" in given.key else given.key for given in given_paths]
    root = storage.RemotePath(given_paths[0].scheme, posixpath.commonpath(parents))
    return [dataclasses.replace(_source(path, path, found, root), listed=listed) for path, found, listed in files]


def _remote_files_of(given, fmt: str | None, glob: str) -> list[tuple[object, str, tuple[int, str]]]:
    """(object, format, (size, ETag)) of each object of the input `given` (one listing)."""
    if given.is_file():
        found = format_of(given, fmt)
        if found is None:
            raise BluesError(f"cannot tell the format of {given} from its extension: "
                             f"pass --format ({', '.join(FORMATS)})")
        info = given.info()
        return [(given, found, (info["size"], info["etag"].strip('"')))]
    matches = storage.list_files(given, glob)
    if not matches:
        if not given.exists():
            raise BluesError(f"input {given} does not exist: check the URI")
        raise BluesError(f"input prefix {given} has no objects matching --glob {glob!r}")
    return [(storage.path(uri), format_of(storage.path(uri), fmt) or "text", (size, etag))
            for uri, size, etag in matches]


def _source(path: Path, located: Path, fmt: str, root: Path) -> Source:
    """`path` is the file read, `located` where the input folder shows it (they differ for symlinks)."""
    label = located.relative_to(root).as_posix()
    real_path = None if path == located else str(path)
    try:
        label.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(label).decode("utf-8", "backslashreplace")
        return Source(path, fmt, shown, real_path, skip="non_utf8_name")
    return Source(path, fmt, label, real_path)


def _files_of(given: Path, fmt: str | None, glob: str) -> list[tuple[Path, Path, str]]:
    """(resolved path, path in the resolved input folder, format) of each file of `given`."""
    if not given.exists():
        raise BluesError(f"input {given} does not exist: check the path")
    if given.is_file():
        found = format_of(given, fmt)
        if found is None:
            raise BluesError(
                f"cannot tell the format of {given} from its extension: "
                f"pass --format ({', '.join(FORMATS)})"
            )
        return [(given.resolve(), given.resolve(), found)]
    try:
        matches = list(given.glob(glob))
    except (ValueError, NotImplementedError) as exc:
        raise BluesError(f"--glob {glob!r}: not a usable pattern relative to {given} ({exc})") from None
    folder = given.resolve()
    located = sorted(Path(os.path.normpath(folder / p.relative_to(given))) for p in matches if p.is_file())
    if not located:
        raise BluesError(f"input folder {given} has no files matching --glob {glob!r}")
    return [(p.resolve(), p, format_of(p, fmt) or "text") for p in located]


@dataclass(frozen=True)
class CsvState:
    """Where a CSV file stands at a byte: its line breaks before it, those of them outside
    quotes (records ended), and whether the byte is inside quotes (1) or not (0)."""

    newlines: int = 0
    records: int = 0
    inside: int = 0


@dataclass(frozen=True)
class Piece:
    """A part of one source that one work item reads (`blues_train.data.work_items` cuts them):
    the whole file (`end` None); a byte range of JSONL or CSV whose records are those that
    begin in [start, end) (`newlines_before`: the line breaks before `start`; CSV: `csv`, the
    file's state at `start`, and `inside_at_end`, whether `end` is inside quotes); or Parquet
    row groups [start, end)."""

    source: Source
    start: int = 0
    end: int | None = None
    newlines_before: int = 0
    csv: CsvState | None = None
    inside_at_end: int = 0


def iter_documents(sources: list[Source], text_field: str, skips: SkipLog) -> Iterator[Document]:
    """Every usable document of every source, read whole, in order; the rest goes to `skips`.

    Raises BluesError when records exist but none of them has `text_field`.
    """
    seen = [False]
    yield from piece_documents([Piece(source) for source in sources], text_field, skips, seen)
    check_field_seen(seen[0], text_field, skips)


def piece_documents(pieces: list[Piece], text_field: str, skips: SkipLog, seen: list[bool]) -> Iterator[Document]:
    """The usable documents of `pieces`, in order; `seen[0]` becomes True once a record had `text_field`."""
    for piece in pieces:
        source = piece.source
        if source.skip:
            if piece.start == 0:
                skips.add(source.skip, source.label)
            continue
        for doc in READERS[source.fmt](piece, text_field, skips):
            seen[0] = True
            if not doc.text or doc.text.isspace():
                skips.add("empty", doc.location)
            else:
                yield doc


def check_field_seen(seen: bool, text_field: str, skips: SkipLog) -> None:
    """BluesError when records exist but none of them has `text_field`."""
    if not seen and skips.missing_field_first and "not_text" not in skips.reasons:
        raise BluesError(
            f"text field {text_field!r} is absent from every record "
            f"(first: {skips.missing_field_first}): pass --text_field NAME"
        )


def repair_text(text: str) -> str:
    """`text` (which is not valid Unicode) with its undecodable bytes turned into U+FFFD.

    Gives exactly `raw_bytes.decode("utf-8", "replace")` for text read by these readers.
    """
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # lone surrogates from JSON escapes: what tiktoken does
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _missing(skips: SkipLog, location: str, count: int = 1) -> None:
    skips.add("missing_field", location, count)
    if skips.missing_field_first is None:
        skips.missing_field_first = location


def _field_text(value, skips: SkipLog, location: str) -> str | None:
    """A record's text field as text, or None (recorded) when it is not text."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    skips.add("not_text", location)
    return None


def read_text_file(piece: Piece, text_field: str, skips: SkipLog) -> Iterator[Document]:
    source = piece.source
    data = source.path.read_bytes()
    if looks_binary(data[:BINARY_SNIFF_BYTES]):
        skips.add("binary", source.label)
        return
    yield Document(data.decode("utf-8", "surrogateescape"), source.label, 0, f"{source.label}:1")


def looks_binary(head: bytes) -> bool:
    """A NUL byte, or more than BINARY_UNDECODABLE_SHARE of the characters not UTF-8."""
    if b"\0" in head:
        return True
    chars = len(head.decode("utf-8", "surrogateescape"))  # one character per undecodable byte
    undecodable = chars - len(head.decode("utf-8", "ignore"))
    return undecodable > BINARY_UNDECODABLE_SHARE * chars


def read_csv(piece: Piece, text_field: str, skips: SkipLog) -> Iterator[Document]:
    """The records of the piece: the whole file, or those that begin in its byte range
    (from the first record boundary at or after `start` to the first at or after `end`)."""
    source = piece.source
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with storage.open_text(source.path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        rows = csv.reader(fh, strict=True)
        header = _csv_header(rows, source)
        if piece.end is None:
            if text_field not in header:
                _missing(skips, f"{source.label}:1 (columns: {', '.join(header)})")
                return
            yield from _csv_rows(rows, source, header.index(text_field), len(header), skips)
            return
    if text_field not in header:
        if piece.start == 0:
            _missing(skips, f"{source.label}:1 (columns: {', '.join(header)})")
        return
    with storage.open_input(source.path) as fh:
        first, state = _csv_boundary(fh, piece.start, piece.csv)
        last, _ = _csv_boundary(fh, piece.end, CsvState(inside=piece.inside_at_end))
        if piece.start == 0:  # the header is the file's first record: the rows start after it
            fh.seek(0)
            rows = csv.reader(_text_lines(fh, last), strict=True)
            _csv_header(rows, source)
            yield from _csv_rows(rows, source, header.index(text_field), len(header), skips)
            return
        if first >= last:
            return
        fh.seek(first)
        rows = csv.reader(_text_lines(fh, last - first, encoding="utf-8"), strict=True)
        yield from _csv_rows(rows, source, header.index(text_field), len(header), skips,
                             index=state.records - 1, lines_before=state.newlines)


def _csv_boundary(fh, position: int, state: CsvState) -> tuple[int, CsvState]:
    """The first record boundary at or after `position` (where a record begins: just after a
    line break outside quotes), given the file's `state` at `position`, and the state there
    (its `newlines` and `records` counted from `state`'s, its `inside` 0)."""
    newlines, records, inside = state.newlines, state.records, state.inside
    if position == 0:
        return 0, state
    fh.seek(position - 1)
    if fh.read(1) == b"\n" and not inside:  # the quote parity before a line break is the one after it
        return position, state
    while block := fh.read(1 << 16):
        quotes = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 0x22)
        for at in _newline_positions(block):
            if (inside + np.searchsorted(quotes, at)) % 2 == 0:
                newlines += block.count(b"\n", 0, at) + 1
                return position + at + 1, CsvState(newlines, records + 1, 0)
        newlines += block.count(b"\n")
        inside = (inside + len(quotes)) % 2
        position += len(block)
    return position, CsvState(newlines, records, inside)


def _newline_positions(block: bytes):
    at = block.find(b"\n")
    while at >= 0:
        yield at
        at = block.find(b"\n", at + 1)


def _text_lines(fh, size: int, encoding: str = "utf-8-sig"):
    """`size` bytes of `fh` from where it stands, as the text lines a CSV reader takes."""
    return io.TextIOWrapper(io.BufferedReader(_Limited(fh, size)), encoding=encoding, errors="surrogateescape",
                            newline="")


class _Limited(io.RawIOBase):
    """At most `size` bytes of `fh`, from where it stands."""

    def __init__(self, fh, size: int):
        self.fh, self.left = fh, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.fh.read(min(len(buffer), self.left))
        buffer[: len(data)] = data
        self.left -= len(data)
        return len(data)


def _csv_header(rows, source: Source) -> list[str]:
    try:
        return next(rows)
    except StopIteration:
        return []
    except csv.Error as exc:
        raise BluesError(f"{source.label}:1: unreadable CSV header ({exc})") from None


def _csv_rows(rows, source, column, width, skips, index: int = 0, lines_before: int = 0) -> Iterator[Document]:
    """The documents of `rows`, the first of them record `index` (after the header) and
    beginning after `lines_before` lines of the file."""
    line = lines_before + rows.line_num + 1
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error:
            skips.add("malformed_csv", f"{source.label}:{line}")
        else:
            location = f"{source.label}:{line}"
            if not row:
                pass  # a blank line between records
            elif len(row) != width:
                skips.add("malformed_csv", location)
            else:
                yield Document(row[column], source.label, index, location)
        index, line = index + 1, lines_before + rows.line_num + 1


def read_jsonl(piece: Piece, text_field: str, skips: SkipLog) -> Iterator[Document]:
    """The records that begin in the piece's byte range: from `start`, after the line break that
    ends the record begun before it, to the end of the record that crosses `end`."""
    source = piece.source
    with storage.open_input(source.path) as fh:
        if piece.end is None:
            yield from _json_lines(fh, source, text_field, skips)
            return
        number, position = piece.newlines_before + 1, 0
        if piece.start > 0:
            fh.seek(piece.start - 1)
            skipped = fh.readline()
            if not skipped.endswith(b"\n"):
                return  # the last record began before the range
            number += len(skipped) > 1  # the line break ending the record begun before `start`
            position = piece.start - 1 + len(skipped)
        yield from _json_lines(_lines_before(fh, position, piece.end), source, text_field, skips, number)


def _lines_before(fh, position: int, end: int):
    """The lines of `fh` (now at byte `position`) that begin before byte `end`."""
    for line in fh:
        if position >= end:
            return
        yield line
        position += len(line)


def read_jsonl_zst(piece: Piece, text_field: str, skips: SkipLog) -> Iterator[Document]:
    source = piece.source
    with storage.open_input(source.path) as fh:
        try:
            lines = io.BufferedReader(ZstdFrames(fh, source.label), buffer_size=ZstdFrames.READ_BYTES)
            yield from _json_lines(lines, source, text_field, skips)
        except zstandard.ZstdError as exc:
            raise BluesError(f"{source.label}: not a valid zstd stream ({exc})") from None


class ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every zstd frame of `fh`, streamed in small reads.

    Unlike zstandard's stream_reader, a stream that ends inside a frame (a truncated
    download or copy) is an error, not a quiet end of data.
    """

    READ_BYTES = 1 << 16

    def __init__(self, fh, label: str):
        self.fh, self.label = fh, label
        self.dctx = zstandard.ZstdDecompressor()
        self.frame = self.dctx.decompressobj()
        self.in_frame = False
        self.out, self.pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.pos == len(self.out):
            data = self.fh.read(self.READ_BYTES)
            if not data:
                if self.in_frame:
                    raise BluesError(f"{self.label}: truncated zstd stream (it ends inside a frame); "
                                     "the file is incomplete: copy or download it again")
                return 0
            self.out, self.pos = self._decompress(data), 0
        n = min(len(buffer), len(self.out) - self.pos)
        buffer[:n] = memoryview(self.out)[self.pos : self.pos + n]
        self.pos += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        parts = []
        while data:
            self.in_frame = True
            parts.append(self.frame.decompress(data))
            data = b""
            if self.frame.eof:
                data, self.in_frame = self.frame.unused_data, False
                self.frame = self.dctx.decompressobj()
        return b"".join(parts)


def parse_json(raw: bytes):
    """What `json.loads` makes of the line, with invalid UTF-8 as lone surrogates (repaired
    later), through orjson where it can (3-4x faster).

    orjson accepts only strict JSON in valid UTF-8, a subset of what `json.loads` does, and
    gives the same strings and objects for it; for the rest (invalid UTF-8, escaped lone
    surrogates, NaN, integers past 64 bits, malformed lines) `json.loads` decides.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw.decode("utf-8", "surrogateescape"))


def _json_lines(lines, source: Source, text_field: str, skips: SkipLog, first: int = 1) -> Iterator[Document]:
    for number, raw in enumerate(lines, start=first):
        location = f"{source.label}:{number}"
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
        if raw.isspace() or not raw:
            continue
        try:
            record = parse_json(raw)
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            skips.add("malformed_json", location)
            continue
        if not isinstance(record, dict):
            skips.add("malformed_json", location)
        elif text_field not in record:
            _missing(skips, location)
        else:
            text = _field_text(record[text_field], skips, location)
            if text is not None:
                yield Document(text, source.label, number - 1, location)


def read_parquet(piece: Piece, text_field: str, skips: SkipLog) -> Iterator[Document]:
    """Rows of one column, a few hundred at a time, of the piece's row groups."""
    if not storage.is_remote(piece.source.path):
        yield from _parquet_rows(piece.source.path, piece, text_field, skips)
        return
    with storage.open_input(piece.source.path) as fh:  # random access through ranged GETs
        yield from _parquet_rows(fh, piece, text_field, skips)


def open_parquet(fh, source: Source) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(fh)
    except (pa.ArrowException, OSError) as exc:
        raise BluesError(f"{source.label}: not a readable Parquet file ({exc})") from None


def _parquet_rows(fh, piece: Piece, text_field: str, skips: SkipLog) -> Iterator[Document]:
    source = piece.source
    table = open_parquet(fh, source)
    names = table.schema_arrow.names
    if text_field not in names:
        if piece.start == 0:  # the whole file's rows, counted once
            rows = table.metadata.num_rows
            _missing(skips, f"{source.label}:row 1 (columns: {', '.join(names)})", rows)
        return
    kind = table.schema_arrow.field(text_field).type
    if not _is_text(kind):
        raise BluesError(f"{source.label}: column {text_field!r} is {kind}, not text")
    groups = range(table.num_row_groups) if piece.end is None else range(piece.start, piece.end)
    index = sum(table.metadata.row_group(g).num_rows for g in range(groups.start))
    if not groups:
        return
    batches = table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field], row_groups=list(groups))
    for batch in batches:
        for value in batch.column(0).to_pylist():
            location = f"{source.label}:row {index + 1}"
            if isinstance(value, bytes):
                value = value.decode("utf-8", "surrogateescape")
            yield Document(value or "", source.label, index, location)
            index += 1


def _is_text(kind) -> bool:
    """Strings or bytes, also dictionary-encoded (what pandas writes for a `category` column)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind))


READERS = {
    "text": read_text_file,
    "csv": read_csv,
    "jsonl": read_jsonl,
    "jsonl.zst": read_jsonl_zst,
    "parquet": read_parquet,
}
