"""`blues prepare`: raw corpora -> a token store (the original `data.py`).

The sources are cut into work items (`work_items`: whole files, JSONL and CSV byte ranges,
Parquet row groups, about 64 MiB of input each) that depend only on the sources, never on who runs
them. An executor (`--executor local|ray`, `blues_train.io.executor`) runs one task per item
(`item_writer.write_item`): it reads its pieces, encodes them with the `--tokenizer_engine`,
cuts chunks at document boundaries once `chunk_tokens` is reached (an item's last chunk holds
its rest), spot-checks them against tiktoken and writes them straight into the store, named
by item and part (a local run with fewer items than workers, such as one large JSONL.zst, runs
its items here, each encoded by every worker). Every engine gives tiktoken's ids, so the chunks, their hashes and the
fingerprint are the same for every engine, executor and worker count. This process only
plans, has the sources hashed through the same executor (in a fresh folder beside the items),
journals finished items and writes the manifest.

Each finished item is recorded in a journal (`.prepare-journal.jsonl`, keyed on the sources'
content hashes and the settings) once its chunks are in place; the manifest is written last.
A killed run leaves no manifest (no visible dataset); the same command skips the journal's
items whose chunks are intact and runs the rest.

Statistics: `input_bytes` counts the UTF-8 bytes of the documents' text (what the
tokenizer saw), `stored_bytes` the chunk files' bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from blues_train.data import encoding_engine, store, tokenizer, work_items
from blues_train.data.encoding_workers import default_workers
from blues_train.data.item_writer import ItemTask, write_item
from blues_train.data.sources import DEFAULT_GLOB, FORMATS, MAX_EXAMPLES, SkipLog, check_field_seen, discover_sources
from blues_train.io import command_line, executor, storage
from blues_train.io.atomic import os_error, sync_dir, write_atomic
from blues_train.io.errors import BluesError
from blues_train.io.folder_lock import check_held, exclusive_writer

DEFAULT_CHUNK_TOKENS = 1 << 21
MAX_CHUNK_TOKENS = (1 << 31) - 1 - (1 << 26)  # a chunk closes after the document that crosses the limit
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
    executor_name="local",
    ray_address=None,
    item_bytes=work_items.ITEM_BYTES,
    run_stats: dict | None = None,
) -> dict:
    """Tokenize `inputs` (files and folders) into the token store `out_dir`; its manifest.

    `tokenizer_engine` is a name (`encoding_engine.CHOICES`) or an engine object (local only);
    `run_stats`, if given, receives what this run did (executor, work items, tokens/s), which
    the manifest leaves out (it is the same whatever ran it).
    """
    if item_bytes < 1:
        raise BluesError(f"--item_bytes must be a positive integer, got {item_bytes}")
    if workers is not None and workers < 1 or not 1 <= chunk_tokens <= MAX_CHUNK_TOKENS:
        raise BluesError(f"--workers must be a positive integer and --chunk_tokens between 1 and "
                         f"{MAX_CHUNK_TOKENS:,} (Arrow list offsets are 32-bit)")
    say = print if progress else _silent
    out = storage.path(out_dir)
    storage.check_output_folder(out, "--cache_dir")
    sources = [s for s in discover_sources(inputs, fmt, glob) if not _inside(s.path, out)]
    if isinstance(tokenizer_engine, str):
        encoding_engine.check_choice(tokenizer_engine)
    engine = (encoding_engine.load_engine(tokenizer_engine) if isinstance(tokenizer_engine, str)
              else tokenizer_engine)
    if executor_name == "local":
        workers = default_workers(engine) if workers is None else workers
    runner = executor.make_executor(executor_name, workers, ray_address)
    settings = {"chunk_tokens": chunk_tokens, "text_field": text_field, "format": fmt, "glob": glob,
                "item_bytes": item_bytes}
    with exclusive_writer(out):
        engine_ref = tokenizer_engine if not isinstance(tokenizer_engine, str) else engine.name
        return write_store(out, sources, settings, runner, engine, engine_ref, say, progress,
                           {} if run_stats is None else run_stats)


def describe_sources(sources, hashes: list[str]) -> list[dict]:
    """Each source's manifest entry, given its sha256."""
    return [{"path": source.label, "bytes": source.path.stat().st_size, "sha256": digest,
             "format": source.fmt, **({"real_path": source.real_path} if source.real_path else {})}
            for source, digest in zip(sources, hashes)]


def write_store(out: Path, sources, settings: dict, runner, engine, engine_ref, say, progress: bool,
                run_stats: dict) -> dict:
    """The store of `sources` in `out`, resuming a killed run; a no-op when up to date.

    What a store is made from (its run key) includes the sources' sha256. Where a manifest or
    a journal may be reused, they are hashed first; in a fresh folder the hashing runs as tasks
    beside the items (one large file's hash would otherwise hold every worker up), and the
    journal begins once the key is known, with the items finished by then."""
    journal_class = RemoteJournal if storage.is_remote(out) else Journal
    described = None
    if journal_class.started(out):
        hashes = dict(runner.run(store.file_sha256, [(source.path,) for source in sources]))
        described = describe_sources(sources, [hashes[n] for n in range(len(sources))])
        current = _finished_manifest(out, run_key(described, settings))
        if current is not None:
            drop_leftover_journal(out)
            say(f"{out}: up to date with its {len(sources)} source(s), nothing to do")
            return current
    items = work_items.plan(runner, sources, [source.path.stat().st_size for source in sources],
                            settings["item_bytes"])

    def open_journal():
        journal = journal_class(out, run_key(described, settings), len(items))
        journal.claim()
        return journal

    journal = open_journal() if described is not None else None
    done = dict(journal.items) if journal else {}
    if done:
        say(f"{out}: resuming after {len(done)} of {len(items)} finished work item(s)")
    todo = [number for number in range(len(items)) if number not in done]
    run_stats.update(executor=runner.name, work_items=len(items), items_run=len(todo), tokens_per_s=0.0)
    hash_tasks = [(store.file_sha256, (source.path,)) for source in sources] if described is None else []
    positions = {source.label: number for number, source in enumerate(sources)}
    item_runner, encode_workers = runner, 1
    if isinstance(runner, executor.LocalExecutor) and len(todo) < runner.workers:
        # fewer items than cores (one large JSONL.zst): items one after another, here, each
        # encoded by every worker, as prepare did before items existed
        item_runner, encode_workers = executor.LocalExecutor(1), runner.workers
    item_tasks = [(write_item, (ItemTask(out, n, items[n], positions, settings["text_field"], settings["chunk_tokens"],
                                         engine_ref, encode_workers),)) for n in todo]
    hashes, waiting = {}, []
    with Meter(progress) as meter:
        for position, result in item_runner.run_tasks(hash_tasks + item_tasks):
            if position < len(hash_tasks):
                hashes[position] = result
            else:
                done[result["item"]] = result
                waiting.append(result)
                meter.update(result["input_bytes"], sum(c["n_tokens"] for c in result["chunks"]))
            if journal is None and len(hashes) == len(hash_tasks):
                described = describe_sources(sources, [hashes[n] for n in range(len(sources))])
                journal = open_journal()
            if journal is not None:
                for record in waiting:
                    journal.record(record)
                waiting = []
        if todo:
            run_stats["tokens_per_s"] = meter.tokens / max(time.perf_counter() - meter.start, 1e-9)
    if journal is None:  # no sources: nothing ran
        described = describe_sources(sources, [])
        journal = open_journal()
    records = [done[number] for number in range(len(items))]
    skips = merged_skips(records)
    tally = Tally(records)
    if not tally.docs:
        journal.discard()
    check_field_seen(any(r["seen_field"] for r in records), settings["text_field"], skips)
    if not tally.docs:
        raise BluesError(f"no documents found in {', '.join(s.label for s in sources) or 'the inputs'} "
                         f"({_skip_text(skips)})")
    manifest = build_manifest(described, settings, tally, skips, engine)
    journal.finish(manifest)
    say(format_summary(manifest, out))
    return manifest


def merged_skips(records: list[dict]) -> SkipLog:
    """The items' skipped records, in item order: what one reader of every source would log."""
    skips = SkipLog()
    for record in records:
        for reason, entry in record["skips"].items():
            merged = skips.reasons.setdefault(reason, {"count": 0, "examples": []})
            merged["count"] += entry["count"]
            merged["examples"] = (merged["examples"] + entry["examples"])[:MAX_EXAMPLES]
        if skips.missing_field_first is None:
            skips.missing_field_first = record["missing_field_first"]
    return skips


def _silent(*args, **kwargs) -> None:
    pass


def _inside(source_path, out) -> bool:
    """Whether a raw file lies in the output store (never read a store as its own input)."""
    if storage.is_remote(source_path) != storage.is_remote(out):
        return False
    return source_path.is_relative_to(out.resolve())


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


class Tally:
    """Totals of the items' chunks, in item order."""

    CHUNK_FIELDS = ("file", "sha256", "n_docs", "n_tokens", "bytes", "index")

    def __init__(self, records: list[dict]):
        every = [chunk for record in records for chunk in record["chunks"]]
        self.chunks = [{k: chunk[k] for k in self.CHUNK_FIELDS} for chunk in every]
        self.docs = sum(c["n_docs"] for c in every)
        self.tokens = sum(c["n_tokens"] for c in every)
        self.input_bytes = sum(c["input_bytes"] for c in every)
        self.repaired = sum(c["repaired"] for c in every)
        self.checked_docs = sum(c["spot_checked_docs"] for c in every)
        self.checked_tokens = sum(c["spot_checked_tokens"] for c in every)
        self.lengths = Counter()
        for record in records:
            self.lengths.update(dict(map(tuple, record["lengths"])))


def _valid_item(out, record, items: int) -> bool:
    """Whether a journal record is a finished item of this plan whose chunks are intact."""
    try:
        return 0 <= record["item"] < items and all(
            chunk["file"] == store.chunk_name(record["item"], part)
            and _has_hash(store.chunk_path(out, chunk), chunk)
            for part, chunk in enumerate(record["chunks"]))
    except (KeyError, TypeError):
        return False


class Journal:
    """Finished items of an unfinished run, so that the same command skips them."""

    @staticmethod
    def started(out: Path) -> bool:
        """Whether `out` holds a manifest or a journal (something a run may keep)."""
        return (out / store.MANIFEST).exists() or (out / JOURNAL).exists()

    def __init__(self, out: Path, key: str, items: int):
        self.out, self.key, self.path = out, key, out / JOURNAL
        self.items = self._valid_records(items)
        self.handle = None

    def _valid_records(self, items: int) -> dict[int, dict]:
        """The journal's items whose chunk files are intact."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return {}
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                break  # the line a killed run was writing
        if not records or not isinstance(records[0], dict) or records[0].get("key") != self.key:
            return {}
        return {r["item"]: r for r in records[1:] if _valid_item(self.out, r, items)}

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
        lines = [json.dumps({"key": self.key})] + [json.dumps(r) for r in self.items.values()]
        write_atomic(self.path, ("\n".join(lines) + "\n").encode())
        self.handle = open(self.path, "a", encoding="utf-8")

    def discard(self) -> None:
        """A run that wrote no chunk leaves no journal."""
        if self.handle is not None:
            self.handle.close()
        self.path.unlink(missing_ok=True)

    def finish(self, manifest: dict) -> None:
        """Remove chunks of an older store, write the manifest, drop the journal."""
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
    item, `.prepare-journal/item-NNNNN.json`, after the item's chunks, and `key.json` (what the
    store is made from) first. A resumed run lists them and keeps the items whose chunk objects
    have their sha256; the manifest, written last, is the commit point."""

    FOLDER = store.REMOTE_JOURNAL

    @classmethod
    def started(cls, out) -> bool:
        return (out / store.MANIFEST).exists() or (out / cls.FOLDER / "key.json").exists()

    def __init__(self, out, key: str, items: int):
        self.out, self.key, self.folder = out, key, out / self.FOLDER
        self.items = self._valid_records(items)
        self.claimed = False

    def _valid_records(self, items: int) -> dict[int, dict]:
        try:
            if json.loads((self.folder / "key.json").read_bytes()).get("key") != self.key:
                return {}
        except (FileNotFoundError, ValueError, AttributeError):
            return {}
        valid = {}
        for record_path in self.folder.glob("item-*.json"):
            try:
                record = json.loads(record_path.read_bytes())
            except (FileNotFoundError, ValueError):
                continue
            if _valid_item(self.out, record, items) and record_path.name == self._name(record["item"]):
                valid[record["item"]] = record
        return valid

    @staticmethod
    def _name(item: int) -> str:
        return f"item-{item:05d}.json"

    def record(self, record: dict) -> None:
        self.claim()
        storage.write_bytes(self.folder / self._name(record["item"]), json.dumps(record).encode())

    def claim(self) -> None:
        """Before this run's first write: the old manifest goes, then the journal is this run's."""
        if self.claimed:
            return
        check_held(self.out)
        (self.out / store.MANIFEST).unlink(missing_ok=True)
        keep = {self._name(item) for item in self.items} | {"key.json"}
        for stale in self.folder.glob("*.json"):
            if stale.name not in keep:
                stale.unlink(missing_ok=True)
        storage.write_bytes(self.folder / "key.json", json.dumps({"key": self.key}).encode())
        self.claimed = True

    def discard(self) -> None:
        """A run that wrote no chunk leaves no journal."""
        storage.remove_tree(self.folder)

    def finish(self, manifest: dict) -> None:
        """Remove chunks of an older store, commit the manifest, drop the journal."""
        self.claim()
        keep = {c["file"] for c in manifest["chunks"]} | {c["index"]["file"] for c in manifest["chunks"]}
        for stale in [*self.out.glob("chunk-*.arrow"), *self.out.glob("chunk-*.idx")]:
            if stale.name not in keep:
                stale.unlink(missing_ok=True)
        check_held(self.out)
        store.write_manifest(self.out, manifest)
        storage.remove_tree(self.folder)


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
                        help="work items at once: local, 1 is this process, more are worker processes "
                             "(default: all cores for tiktoken, all but one for gigatoken); "
                             "ray, tasks in flight (default: as many as the cluster runs)")
    parser.add_argument("--tokenizer_engine", choices=encoding_engine.CHOICES, default="auto",
                        help="gigatoken (checked against tiktoken), tiktoken, or auto: gigatoken "
                             "where it is installed (default)")
    parser.add_argument("--chunk_tokens", type=int, default=DEFAULT_CHUNK_TOKENS,
                        help=f"tokens per chunk file (default {DEFAULT_CHUNK_TOKENS:,})")
    parser.add_argument("--item_bytes", type=int, default=work_items.ITEM_BYTES,
                        help="input bytes per work item: large JSONL and Parquet files are cut to about "
                             "this size; the chunk files depend on it")
    executor.add_flags(parser, "the work items (reading, tokenizing, writing chunks)")
    return parser


def parse_args(argv):
    return flag_parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    prepare_dataset(
        args.input_dir + args.dataset, args.cache_dir, fmt=args.format, text_field=args.text_field,
        glob=args.glob, workers=args.workers, chunk_tokens=args.chunk_tokens,
        tokenizer_engine=args.tokenizer_engine, executor_name=args.executor, ray_address=args.ray_address,
        item_bytes=args.item_bytes,
    )
    return 0


if __name__ == "__main__":
    from blues_train.io.command_line import run_command

    sys.exit(run_command(main, sys.argv[1:]))
