"""`blues prepare`: raw corpora -> a token store (the original `data.py`).

The main process reads documents in order, repairs undecodable bytes and cuts them into
batches of about a MiB of text; the `--tokenizer_engine` encodes them (`encoding_engine`), on
the main thread for one worker, in forked worker processes for more (`encoding_workers`);
the main process collects the ids in order and cuts chunks at document boundaries once
`chunk_tokens` is reached; a writer thread spot-checks each chunk against tiktoken
(`spot_check`), compresses, hashes and writes it. Chunk boundaries depend only on the
documents' token counts, and every engine gives tiktoken's ids, so the chunks, their hashes
and the fingerprint are the same for every engine and worker count. At most a few batches
per worker are in flight, and encode caches that have grown too much are dropped, so memory
does not grow with the corpus.

Each finished chunk is renamed into place and then recorded in a journal
(`.prepare-journal.jsonl`, keyed on the sources' content hashes and the settings); the
manifest is written last. A killed run leaves no manifest (no visible dataset); the same
command re-reads the documents of the journal's chunks without tokenizing them and goes on.

Statistics: `input_bytes` counts the UTF-8 bytes of the documents' text (what the
tokenizer saw), `stored_bytes` the chunk files' bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from blues_train.data import doc_index, encoding_engine, spot_check, store, tokenizer
from blues_train.data.encoding_workers import default_workers, encode_batches
from blues_train.data.sources import DEFAULT_GLOB, FORMATS, SkipLog, discover_sources, iter_documents, repair_text
from blues_train.io import command_line, storage
from blues_train.io.atomic import os_error, sync_dir, write_atomic
from blues_train.io.errors import BluesError
from blues_train.io.folder_lock import check_held, exclusive_writer

DEFAULT_CHUNK_TOKENS = 1 << 21
MAX_CHUNK_TOKENS = (1 << 31) - 1 - (1 << 26)  # a chunk closes after the document that crosses the limit
BATCH_CHARS = 1 << 20
JOURNAL = store.JOURNAL
LOG_EVERY_S = 5.0


def prepare_dataset(
    inputs,
    out_dir,
    *,
    fmt=None,
    text_field="text",
    glob=DEFAULT_GLOB,
    workers=None,
    chunk_tokens=DEFAULT_CHUNK_TOKENS,
    tokenizer_engine="auto",
    progress=True,
) -> dict:
    """Tokenize `inputs` (files and folders) into the token store `out_dir`; its manifest.

    `tokenizer_engine` is a name (`encoding_engine.CHOICES`) or an engine object.
    """
    if workers is not None and workers < 1 or not 1 <= chunk_tokens <= MAX_CHUNK_TOKENS:
        raise BluesError(f"--workers must be a positive integer and --chunk_tokens between 1 and "
                         f"{MAX_CHUNK_TOKENS:,} (Arrow list offsets are 32-bit)")
    say = print if progress else _silent
    out = storage.path(out_dir)
    storage.check_output_folder(out, "--cache_dir")
    sources = [s for s in discover_sources(inputs, fmt, glob) if not _inside(s.path, out)]
    described = [_describe(source) for source in sources]
    settings = {"chunk_tokens": chunk_tokens, "text_field": text_field, "format": fmt, "glob": glob}
    if isinstance(tokenizer_engine, str):
        encoding_engine.check_choice(tokenizer_engine)
    with exclusive_writer(out):
        return write_store(out, sources, described, settings, workers, say, progress, tokenizer_engine)


def write_store(out: Path, sources, described: list[dict], settings: dict, workers: int | None, say,
                progress: bool, tokenizer_engine) -> dict:
    """The store of `sources` in `out`, resuming a killed run; a no-op when up to date."""
    key = run_key(described, settings)
    current = _finished_manifest(out, key)
    if current is not None:
        drop_leftover_journal(out)
        say(f"{out}: up to date with its {len(sources)} source(s), nothing to do")
        return current
    engine = (encoding_engine.load_engine(tokenizer_engine) if isinstance(tokenizer_engine, str)
              else tokenizer_engine)
    workers = default_workers(engine) if workers is None else workers
    journal = (RemoteJournal if storage.is_remote(out) else Journal)(out, key)
    tally = Tally()
    if journal.chunks:
        tally.resume(out, journal.chunks)
        say(f"{out}: resuming after {len(journal.chunks)} finished chunk(s), {tally.docs} documents")
    skips = SkipLog()
    docs = iter_documents(sources, settings["text_field"], skips)
    docs = itertools.islice(docs, tally.docs, None)  # read again, not tokenized again
    batches = ((batch, batch.texts) for batch in _batches(docs))
    with Meter(progress) as meter, ChunkBuilder(out, journal, tally, settings["chunk_tokens"], engine,
                                                 [d["path"] for d in described]) as builder:
        for batch, ids in encode_batches(batches, engine, workers):
            builder.add(batch, ids)
            meter.update(sum(batch.sizes), sum(map(len, ids)))
        builder.flush()
    if not tally.docs:
        raise BluesError(f"no documents found in {', '.join(s.label for s in sources) or 'the inputs'} "
                         f"({_skip_text(skips)})")
    manifest = build_manifest(described, settings, tally, skips, engine)
    journal.finish(manifest)
    say(format_summary(manifest, out))
    return manifest


def _silent(*args, **kwargs) -> None:
    pass


def _inside(source_path, out) -> bool:
    """Whether a raw file lies in the output store (never read a store as its own input)."""
    if storage.is_remote(source_path) != storage.is_remote(out):
        return False
    return source_path.is_relative_to(out.resolve())


def _describe(source) -> dict:
    size = source.path.stat().st_size
    return {"path": source.label, "bytes": size, "sha256": store.file_sha256(source.path),
            "format": source.fmt, **({"real_path": source.real_path} if source.real_path else {})}


def run_key(sources: list[dict], settings: dict) -> str:
    """What a store is made from: tokenizer, sources' content and settings."""
    what = {"format_version": store.FORMAT_VERSION, "tokenizer": tokenizer.tokenizer_info(),
            "sources": sources, "settings": settings}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _finished_manifest(out: Path, key: str) -> dict | None:
    """The existing manifest if it was made from the same inputs and all its chunks are there."""
    try:
        manifest = store.read_manifest(out)
    except BluesError:
        return None
    if run_key(manifest["sources"], manifest.get("settings", {})) != key:
        return None
    if tokenizer.tokenizer_mismatch(manifest["tokenizer"]):
        return None
    sizes = _chunk_sizes(out) if storage.is_remote(out) else None
    for chunk in manifest["chunks"]:
        if sizes is not None:
            if sizes.get(chunk["file"]) != chunk["bytes"]:
                return None
            continue
        path = store.chunk_path(out, chunk)
        if not path.is_file() or path.stat().st_size != chunk["bytes"]:
            return None
    return manifest


def drop_leftover_journal(out) -> None:
    """The journal of a run killed between committing its manifest and dropping the journal:
    the manifest is final, so the journal is only litter."""
    journal = store.journal_path(out)
    if storage.is_remote(out):
        storage.remove_tree(journal)
    else:
        journal.unlink(missing_ok=True)


def _chunk_sizes(out) -> dict[str, int]:
    """{chunk file name: bytes} of the chunks present in `out` (one listing)."""
    return {storage.path(p).name: size for p, size, _ in storage.list_files(out, "chunk-*.arrow")}


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


class Tally:
    """Running totals of the chunks written so far (this run's and a resumed run's)."""

    def __init__(self):
        self.chunks, self.docs, self.tokens, self.input_bytes, self.repaired = [], 0, 0, 0, 0
        self.checked_docs = self.checked_tokens = 0
        self.lengths = Counter()

    def add(self, record: dict, lengths) -> None:
        """`record`: a chunk's journal record."""
        self.chunks.append({k: record[k] for k in ("file", "sha256", "n_docs", "n_tokens", "bytes", "index")})
        self.docs += record["n_docs"]
        self.tokens += record["n_tokens"]
        self.input_bytes += record["input_bytes"]
        self.repaired += record["repaired"]
        self.checked_docs += record.get("spot_checked_docs", 0)
        self.checked_tokens += record.get("spot_checked_tokens", 0)
        self.lengths.update(lengths.tolist())

    def resume(self, out: Path, records: list[dict]) -> None:
        for record in records:
            table = store.read_chunk(store.chunk_path(out, record))
            self.add(record, store.doc_lengths(table))


class Journal:
    """Finished chunks of an unfinished run, so that the same command skips them."""

    def __init__(self, out: Path, key: str):
        self.out, self.key, self.path = out, key, out / JOURNAL
        self.chunks = self._valid_records()
        self.handle = None

    def _valid_records(self) -> list[dict]:
        """The journal's chunks whose files are intact, up to the first that is not."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return []
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                break  # the line a killed run was writing
        if not records or records[0].get("key") != self.key:
            return []
        valid = []
        for number, record in enumerate(records[1:]):
            path = store.chunk_path(self.out, record)
            if record.get("file") != store.chunk_name(number) or not _has_hash(path, record):
                break
            valid.append(record)
        return valid

    def record(self, record: dict) -> None:
        self.claim()
        try:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()
            os.fsync(self.handle.fileno())
        except OSError as exc:  # a torn last line is ignored on resume
            raise os_error(exc, self.path) from None

    def claim(self) -> None:
        """Before this run's first write: the old manifest goes (the folder is now a partial store)."""
        if self.handle is not None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / store.MANIFEST).unlink(missing_ok=True)
        lines = [json.dumps({"key": self.key})] + [json.dumps(c) for c in self.chunks]
        write_atomic(self.path, ("\n".join(lines) + "\n").encode())
        self.handle = open(self.path, "a", encoding="utf-8")

    def finish(self, manifest: dict) -> None:
        """Remove chunks of an older, larger store, write the manifest, drop the journal."""
        self.claim()
        self.handle.close()
        keep = {c["file"] for c in manifest["chunks"]}
        keep |= {c["index"]["file"] for c in manifest["chunks"]}
        for stale in [*self.out.glob("chunk-*.arrow"), *self.out.glob("chunk-*.idx"), *self.out.glob(".*.tmp")]:
            if stale.name not in keep:
                stale.unlink()
        check_held(self.out)
        store.write_manifest(self.out, manifest)
        self.path.unlink()
        sync_dir(self.out)


def _has_hash(path, record: dict) -> bool:
    """Whether the chunk at `path` and its index are the ones `record` describes."""
    index = record.get("index")
    if not isinstance(index, dict) or not storage.is_plain_name(index.get("file")):
        return False
    files = ((path, record), (path.parent / index["file"], index))
    return all(file.is_file() and store.file_sha256(file) == entry.get("sha256") for file, entry in files)


class RemoteJournal:
    """The journal of a store on object storage, which has no append: one object per finished
    chunk, `.prepare-journal/chunk-NNNNN.json`, after the chunk itself, and `key.json` (what the
    store is made from) first. A resumed run lists them, checks each chunk object's sha256 and
    keeps the chunks up to the first that is missing or differs; the manifest, written last,
    is the commit point."""

    FOLDER = store.REMOTE_JOURNAL

    def __init__(self, out, key: str):
        self.out, self.key, self.folder = out, key, out / self.FOLDER
        self.chunks = self._valid_records()
        self.claimed = False

    def _valid_records(self) -> list[dict]:
        try:
            if json.loads((self.folder / "key.json").read_bytes()).get("key") != self.key:
                return []
        except (FileNotFoundError, ValueError, AttributeError):
            return []
        valid = []
        for number, record_path in enumerate(self.folder.glob("chunk-*.json")):
            try:
                record = json.loads(record_path.read_bytes())
            except (FileNotFoundError, ValueError):
                break
            path = store.chunk_path(self.out, record)
            if record.get("file") != store.chunk_name(number) or record_path.name != f"chunk-{number:05d}.json" \
                    or not _has_hash(path, record):
                break
            valid.append(record)
        return valid

    def record(self, record: dict) -> None:
        self.claim()
        storage.write_bytes(self.folder / record["file"].replace(".arrow", ".json"), json.dumps(record).encode())

    def claim(self) -> None:
        """Before this run's first write: the old manifest goes, then the journal is this run's."""
        if self.claimed:
            return
        check_held(self.out)
        (self.out / store.MANIFEST).unlink(missing_ok=True)
        keep = {c["file"].replace(".arrow", ".json") for c in self.chunks} | {"key.json"}
        for stale in self.folder.glob("*.json"):
            if stale.name not in keep:
                stale.unlink(missing_ok=True)
        storage.write_bytes(self.folder / "key.json", json.dumps({"key": self.key}).encode())
        self.claimed = True

    def finish(self, manifest: dict) -> None:
        """Remove chunks of an older, larger store, commit the manifest, drop the journal."""
        self.claim()
        keep = {c["file"] for c in manifest["chunks"]} | {c["index"]["file"] for c in manifest["chunks"]}
        for stale in [*self.out.glob("chunk-*.arrow"), *self.out.glob("chunk-*.idx")]:
            if stale.name not in keep:
                stale.unlink(missing_ok=True)
        check_held(self.out)
        store.write_manifest(self.out, manifest)
        storage.remove_tree(self.folder)


class ChunkBuilder:
    """Collects tokenized documents and writes a chunk whenever chunk_tokens is reached.

    Spot-checking, compressing, hashing and writing a chunk run on one writer thread (zstd,
    sha256 and file I/O release the GIL, tiktoken for part of its work), so the main thread
    reads and encodes meanwhile; at most one finished chunk waits for it, in order. Leaving
    the `with` block waits for the last write.
    """

    def __init__(self, out: Path, journal: Journal, tally: Tally, chunk_tokens: int, engine, labels: list[str]):
        self.out, self.journal, self.tally, self.chunk_tokens = out, journal, tally, chunk_tokens
        self.position = {label: number for number, label in enumerate(labels)}  # a source's place in the manifest
        self.engine = engine
        self.reference = None if engine.is_reference else encoding_engine.load_engine("tiktoken")
        self.writer = ThreadPoolExecutor(1)
        self.pending = None
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
            if self.n_tokens >= self.chunk_tokens:
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
        name = store.chunk_name(len(self.tally.chunks))
        index = doc_index.encode_index(lengths, [self.position[s] for s in sources], indices)
        self.journal.claim()
        storage.write_bytes(self.out / doc_index.index_name(name), index)
        storage.write_bytes(self.out / name, data)
        record = {"file": name, "sha256": hashlib.sha256(data).hexdigest(),
                  "n_docs": len(lengths), "n_tokens": len(tokens), "bytes": len(data),
                  "index": doc_index.index_entry(doc_index.index_name(name), index),
                  "input_bytes": input_bytes, "repaired": repaired,
                  "spot_checked_docs": checked[0], "spot_checked_tokens": checked[1]}
        self.journal.record(record)
        self.tally.add(record, lengths)


def build_manifest(sources: list[dict], settings: dict, tally: Tally, skips: SkipLog, engine) -> dict:
    info = tokenizer.tokenizer_info()
    stored = sum(c["bytes"] for c in tally.chunks)
    return {
        "format_version": store.FORMAT_VERSION,
        "kind": store.KIND,
        "tokenizer": info,
        "tokenizer_engine": {**encoding_engine.engine_info(engine),
                             "spot_check": {"docs": tally.checked_docs, "tokens": tally.checked_tokens}},
        "sources": sources,
        "chunks": tally.chunks,
        "totals": {"docs": tally.docs, "tokens": tally.tokens,
                   "input_bytes": tally.input_bytes, "stored_bytes": stored},
        "stats": {
            "input_bytes_per_token": round(tally.input_bytes / max(tally.tokens, 1), 4),
            "stored_bytes_per_token": round(stored / max(tally.tokens, 1), 4),
            "doc_tokens_percentiles": store.percentiles(tally.lengths),
            "replacement_char_docs": tally.repaired,
        },
        "skipped": skips.as_dict(),
        "settings": settings,
        "fingerprint": store.fingerprint(info["vocab_sha256"], [c["sha256"] for c in tally.chunks]),
    }


def _skip_text(skips: SkipLog) -> str:
    if not skips.reasons:
        return "nothing skipped"
    parts = [f"{r}: {e['count']} (e.g. {', '.join(e['examples'][:2])})" for r, e in skips.as_dict().items()]
    return "skipped " + "; ".join(parts)


def format_summary(manifest: dict, out) -> str:
    totals, stats = manifest["totals"], manifest["stats"]
    pct = " ".join(f"{k}={v}" for k, v in stats["doc_tokens_percentiles"].items())
    skipped = {reason: entry["count"] for reason, entry in manifest["skipped"].items()}
    return "\n".join([
        f"token store {out}: {len(manifest['chunks'])} chunk(s), fingerprint {manifest['fingerprint'][:16]}",
        f"  documents {totals['docs']:,}  tokens {totals['tokens']:,}",
        f"  input {stats['input_bytes_per_token']} bytes/token  stored {stats['stored_bytes_per_token']} bytes/token",
        f"  tokens per document: {pct}",
        f"  invalid UTF-8 repaired in {stats['replacement_char_docs']} document(s); skipped {skipped or 'none'}",
    ])


class Meter:
    """A tqdm bar (MB/s, tokens/s) on a terminal, a log line every few seconds otherwise."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None
        self.start = self.last_log = time.perf_counter()
        self.bytes = self.tokens = 0

    def __enter__(self):
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="prepare")
        return self

    def update(self, n_bytes: int, n_tokens: int) -> None:
        self.bytes += n_bytes
        self.tokens += n_tokens
        if self.bar is not None:
            self.bar.update(n_bytes)
            self.bar.set_postfix_str(f"{self._rate(self.tokens) / 1e6:.2f}M tok/s", refresh=False)
        elif self.enabled and time.perf_counter() - self.last_log >= LOG_EVERY_S:
            self.last_log = time.perf_counter()
            print(self._line(), file=sys.stderr, flush=True)

    def _rate(self, amount: int) -> float:
        return amount / max(time.perf_counter() - self.start, 1e-9)

    def _line(self) -> str:
        return (f"prepare: {self.bytes / 1e6:.1f} MB, {self.tokens:,} tokens, "
                f"{self._rate(self.bytes) / 1e6:.1f} MB/s, {self._rate(self.tokens) / 1e6:.2f}M tokens/s")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and exc[0] is None:
            print(self._line(), file=sys.stderr, flush=True)
        return False


def flag_parser() -> argparse.ArgumentParser:
    parser = command_line.flag_parser("blues prepare", __doc__.splitlines()[0])
    parser.add_argument("--input_dir", action="append", default=[], metavar="DIR",
                        help="folder of raw files (repeatable; default: none, give --input_dir or --dataset)")
    parser.add_argument("--dataset", action="append", default=[], metavar="FILE",
                        help="one raw file: .txt .csv .jsonl .jsonl.zst .parquet (repeatable; default: none)")
    parser.add_argument("--cache_dir", "--data_cache_dir", dest="cache_dir", required=True,
                        metavar="DIR", help="the token store folder to write")
    parser.add_argument("--format", choices=FORMATS, help="format of every input (default: from extension)")
    parser.add_argument("--text_field", default="text", help="CSV column / JSON field / Parquet column")
    parser.add_argument("--glob", default=DEFAULT_GLOB, help="files to take from --input_dir folders, "
                        "recursively with **")
    parser.add_argument("--workers", type=int, default=None,
                        help="cores that tokenize: 1 is this process, more are worker processes "
                             "(default: all cores for tiktoken, all but one for gigatoken)")
    parser.add_argument("--tokenizer_engine", choices=encoding_engine.CHOICES, default="auto",
                        help="gigatoken (checked against tiktoken), tiktoken, or auto: gigatoken "
                             "where it is installed (default)")
    parser.add_argument("--chunk_tokens", type=int, default=DEFAULT_CHUNK_TOKENS,
                        help=f"tokens per chunk file (default {DEFAULT_CHUNK_TOKENS:,})")
    return parser


def parse_args(argv):
    return flag_parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    prepare_dataset(
        args.input_dir + args.dataset, args.cache_dir, fmt=args.format, text_field=args.text_field,
        glob=args.glob, workers=args.workers, chunk_tokens=args.chunk_tokens,
        tokenizer_engine=args.tokenizer_engine,
    )
    return 0


if __name__ == "__main__":
    from blues_train.io.command_line import run_command

    sys.exit(run_command(main, sys.argv[1:]))
