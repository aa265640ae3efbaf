"""`blues verify PATH...`: integrity of token stores and mixtures, with each fault's location.

A token store: every chunk's sha256, no missing and no stray chunk file, the Arrow schema,
documents and tokens per chunk and in total against the manifest, token ids below n_vocab,
the tokenizer hash. A mixture: its sources (each verified as a store) still have the
fingerprints it recorded, its shares are consistent, and the loader realizes them (read
from the stores' document index, one chunk at a time: no loader is built). A store's chunks
are checked on a thread per core, or as Ray tasks (`--executor ray`), each reading its chunk itself.
One line per problem naming the file (and row), then a statistics table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from blues_train.data import doc_index, store
from blues_train.data.tokenizer import N_VOCAB, tokenizer_mismatch
from blues_train.io import command_line, executor, storage
from blues_train.io.errors import BluesError
from blues_train.mixture.spec import MIXTURE_FILE, mixture_fingerprint, read_mixture, source_manifest

SHARE_TOLERANCE = 0.01
MAX_VERIFY_THREADS = 16


@dataclass
class Problem:
    file: str
    message: str
    row: int | None = None

    def line(self) -> str:
        where = self.file if self.row is None else f"{self.file}: row {self.row}"
        return f"{where}: {self.message}"


@dataclass
class VerifyReport:
    problems: list[Problem] = field(default_factory=list)
    datasets: list[dict] = field(default_factory=list)
    mixtures: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, file, message: str, row: int | None = None) -> None:
        self.problems.append(Problem(str(file), message, row))

    def problem_lines(self) -> list[str]:
        return [problem.line() for problem in self.problems]

    def to_dict(self) -> dict:
        return {"ok": self.ok, "problems": [asdict(p) for p in self.problems],
                "datasets": self.datasets, "mixtures": self.mixtures}


def verify_paths(paths, progress: bool = False, runner=None) -> VerifyReport:
    """Verify each path, a token store or a mixture (whose sources are verified too); with
    `progress`, a bar of chunks on a terminal's stderr; `runner`: an executor for the chunks
    (`blues_train.io.executor`; default: threads here)."""
    report = VerifyReport()
    verified: set[Path] = set()
    for path in map(storage.path, paths):
        try:
            if not path.exists():
                report.add(path, "not found")
            elif (path / MIXTURE_FILE).is_file():
                verify_mixture(path, report, verified, progress, runner)
            else:
                verify_store_once(path, report, verified, progress, runner)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a field of the wrong shape
            report.add(path, f"malformed manifest: {type(exc).__name__} {exc}; prepare or merge it again")
    return report


def verify_store_once(path: Path, report: VerifyReport, verified: set[Path], progress: bool = False,
                      runner=None) -> None:
    if path.resolve() not in verified:
        verified.add(path.resolve())
        verify_store(path, report, progress, runner)


def verify_store(path: Path, report: VerifyReport, progress: bool = False, runner=None) -> None:
    try:
        manifest = store.read_manifest(path)
    except BluesError as exc:
        report.add(path / store.MANIFEST, str(exc).removeprefix(f"{path / store.MANIFEST}: "))
        return
    manifest_file = path / store.MANIFEST
    mismatch = tokenizer_mismatch(manifest["tokenizer"])
    if mismatch:
        report.add(manifest_file, f"{mismatch}; prepare the dataset again")
    if store.store_fingerprint(manifest) != manifest["fingerprint"]:
        report.add(manifest_file, "fingerprint does not match the tokenizer and chunk hashes")
    check_chunk_files(path, manifest, report)
    if store.journal_path(path).exists():
        report.add(store.journal_path(path), "journal of a prepare run killed after writing manifest.json: "
                   "run the same `blues prepare` again to remove it")
    labels = [source["path"] for source in manifest["sources"]]
    lengths = Counter()  # tokens -> documents: bounded by the longest document, not by their number
    checked = (map_chunks(partial(verify_chunk_alone, path, labels), manifest["chunks"]) if runner is None
               else in_order(runner.run(verify_chunk_alone, [(path, labels, number, chunk) for number, chunk
                                                             in enumerate(manifest["chunks"])])))
    for problems, chunk_lengths in command_line.progress(checked, f"verify {path.name}", progress,
                                                         total=len(manifest["chunks"]), unit="chunk"):
        report.problems.extend(problems)
        lengths.update(chunk_lengths.tolist())
    check_totals(manifest, manifest_file, report)
    report.datasets.append(dataset_stats(path, manifest, lengths))


def map_chunks(check, chunks: list[dict]):
    """`check(number, chunk)` of every chunk, on a thread per core (hashing, decompressing and
    Arrow's validation release the GIL), in chunk order; at most a few chunks ahead in flight."""
    workers = max(1, min(os.cpu_count() or 1, MAX_VERIFY_THREADS))
    with ThreadPoolExecutor(workers, "blues-verify") as pool:
        pending = deque()
        for number, chunk in enumerate(chunks):
            pending.append(pool.submit(check, number, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def in_order(results):
    """The results of `executor.run` (position, result), in position order, each as soon as
    those before it have come."""
    waiting, following = {}, 0
    for position, result in results:
        waiting[position] = result
        while following in waiting:
            yield waiting.pop(following)
            following += 1


def verify_chunk_alone(path, labels: list[str], number: int, chunk: dict) -> tuple[list[Problem], np.ndarray]:
    """`verify_chunk` into a report of its own: (its problems, its document lengths)."""
    report = VerifyReport()
    lengths = verify_chunk(path, number, chunk, labels, report)
    return report.problems, lengths


def check_chunk_files(path: Path, manifest: dict, report: VerifyReport) -> None:
    listed = {chunk["file"] for chunk in manifest["chunks"]}
    present = {p.name for p in path.glob("*.arrow")}
    for name in sorted(listed - present):
        report.add(path / name, "missing: listed in manifest.json but not on disk")
    for name in sorted(present - listed):
        report.add(path / name, "stray chunk: on disk but not listed in manifest.json")


def verify_chunk(path: Path, number: int, chunk: dict, labels: list[str], report: VerifyReport):
    """Check one chunk against its manifest entry; its document lengths (empty if unreadable)."""
    file = store.chunk_path(path, chunk)
    empty = np.zeros(0, dtype=np.int64)
    data = None
    if isinstance(file, storage.RemotePath):  # one GET: the bytes hashed are the bytes parsed
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            return empty
        digest = hashlib.sha256(data).hexdigest()
    elif not file.is_file():
        return empty
    else:
        digest = store.file_sha256(file)
    if digest != chunk.get("sha256"):
        report.add(file, f"sha256 {digest} differs from manifest.json chunks[{number}].sha256 "
                   f"{chunk.get('sha256')}: the file is corrupt or was replaced")
        return empty  # its contents mean nothing, and parsing corrupt buffers can crash Arrow
    try:
        table = store.read_chunk(file, data)
        table.validate(full=True)
    except BluesError as exc:
        report.add(file, str(exc).removeprefix(f"{file}: "))
        return empty
    except pa.ArrowException as exc:
        report.add(file, f"unreadable Arrow data ({exc})")
        return empty
    if not table.schema.equals(store.SCHEMA):
        report.add(file, f"schema {table.schema.to_string(show_schema_metadata=False)!r} is not "
                   f"{store.SCHEMA.to_string()!r}")
        return empty
    lengths = store.doc_lengths(table).astype(np.int64)
    check_counts(path / store.MANIFEST, number, chunk, file, table.num_rows, lengths, report)
    check_token_ids(file, table, lengths, report)
    if check_labels(file, table, set(labels), report):
        index_problem = doc_index.verify_index(path, chunk, table, labels)
        if index_problem:
            report.add(*index_problem)
    return lengths


def check_counts(manifest_file, number, chunk, file, rows, lengths, report) -> None:
    for field_name, actual in (("n_docs", rows), ("n_tokens", int(lengths.sum()))):
        if chunk.get(field_name) != actual:
            report.add(manifest_file, f"chunks[{number}].{field_name} = {chunk.get(field_name)} "
                       f"but {file.name} holds {actual}")


def check_token_ids(file: Path, table, lengths: np.ndarray, report: VerifyReport) -> None:
    tokens = store.integers(pc.list_flatten(table.column("tokens")))
    bad = np.flatnonzero(tokens >= N_VOCAB)
    if len(bad):
        row = int(np.searchsorted(np.cumsum(lengths), bad[0], side="right"))
        report.add(file, f"token id {int(tokens[bad[0]])} >= n_vocab {N_VOCAB} "
                   f"({len(bad)} such ids in this chunk)", row=row)


def check_labels(file: Path, table, labels: set, report: VerifyReport) -> bool:
    """Whether every row's source is in the manifest (else the first one that is not is reported)."""
    sources = table.column("source").to_pylist()
    for row, label in enumerate(sources):
        if label not in labels:
            report.add(file, f"source {label!r} is not in manifest.json sources", row=row)
            return False
    return True


def check_totals(manifest: dict, manifest_file: Path, report: VerifyReport) -> None:
    totals = manifest["totals"]
    for total_field, chunk_field in (("docs", "n_docs"), ("tokens", "n_tokens")):
        listed = sum(chunk.get(chunk_field, 0) for chunk in manifest["chunks"])
        if totals.get(total_field) != listed:
            report.add(manifest_file, f"totals.{total_field} = {totals.get(total_field)} but "
                       f"its chunks list {listed}")


def dataset_stats(path: Path, manifest: dict, lengths: Counter) -> dict:
    """`lengths`: documents by their tokens, {tokens: documents}."""
    tokens = sum(length * count for length, count in lengths.items())
    return {
        "path": str(path),
        "fingerprint": manifest["fingerprint"],
        "docs": sum(lengths.values()),
        "tokens": tokens,
        "stored_bytes_per_token": round(manifest["totals"].get("stored_bytes", 0) / max(tokens, 1), 4),
        "input_bytes_per_token": round(manifest["totals"].get("input_bytes", 0) / max(tokens, 1), 4),
        "doc_tokens_percentiles": store.percentiles(lengths),
    }


def verify_mixture(path: Path, report: VerifyReport, verified: set[Path], progress: bool = False,
                   runner=None) -> None:
    mixture_file = path / MIXTURE_FILE
    try:
        mixture = read_mixture(path)
    except BluesError as exc:
        report.add(mixture_file, str(exc).removeprefix(f"{mixture_file}: "))
        return
    before = len(report.problems)
    if mixture_fingerprint(mixture) != mixture["fingerprint"]:
        report.add(mixture_file, "fingerprint does not match its contents: edited after merging")
    mismatch = tokenizer_mismatch(mixture["tokenizer"])
    if mismatch:
        report.add(mixture_file, f"{mismatch}; re-run `blues merge`")
    check_shares(mixture, mixture_file, report)
    for entry in mixture["sources"]:
        check_source(entry, mixture_file, report, verified, progress, runner)
    if mixture.get("dedup"):
        check_dedup(mixture, mixture_file, report)
    stats = {"path": str(path), "fingerprint": mixture["fingerprint"],
             "strategy": mixture["strategy"], "total_tokens": mixture["total_tokens"],
             "sources": []}
    if len(report.problems) == before:
        stats["sources"] = check_realized_shares(mixture, mixture_file, report)
    report.mixtures.append(stats)


def check_shares(mixture: dict, mixture_file: Path, report: VerifyReport) -> None:
    sources, total = mixture["sources"], mixture["total_tokens"]
    if sum(s["tokens"] for s in sources) != total:
        report.add(mixture_file, f"sources' tokens sum to {sum(s['tokens'] for s in sources)}, "
                   f"total_tokens is {total}")
    if abs(sum(s["weight"] for s in sources) - 1) > 1e-6:
        report.add(mixture_file, f"source weights sum to {sum(s['weight'] for s in sources)}, not 1")
    for number, source in enumerate(sources):
        share = source["tokens"] / max(total, 1)
        if abs(share - source["weight"]) > SHARE_TOLERANCE:
            report.add(mixture_file, f"sources[{number}] ({source['path']}) gets {share:.4f} of the "
                       f"tokens, its weight is {source['weight']:.4f}")


def check_source(entry: dict, mixture_file: Path, report: VerifyReport, verified: set[Path],
                 progress: bool = False, runner=None) -> None:
    path = storage.path(entry["path"])
    if not path.is_dir():
        report.add(path, f"source of {mixture_file} not found")
        return
    verify_store_once(path, report, verified, progress, runner)
    manifest_file = path / store.MANIFEST
    try:
        source_manifest(entry)
    except BluesError as exc:
        problem = Problem(str(manifest_file), str(exc).removeprefix(f"{manifest_file}: "))
        if problem not in report.problems:  # an unreadable manifest, which verify_store reported
            report.problems.append(problem)


def check_dedup(mixture: dict, mixture_file: Path, report: VerifyReport) -> None:
    """The dedup result the mixture was merged with is still the one it recorded, whole,
    and was computed from these stores."""
    from blues_train.mixture import dedup

    try:
        dedup.current_result(mixture)
        dedup.mixture_record(mixture["dedup"]["path"], [s["fingerprint"] for s in mixture["sources"]])
    except BluesError as exc:
        report.add(mixture_file, f"dedup: {exc}")


def check_realized_shares(mixture: dict, mixture_file: Path, report: VerifyReport) -> list[dict]:
    """Target vs realized shares of pass 0 as the loader builds it, and true repeat factors."""
    from blues_train.mixture.loader import realized_shares  # the loader imports torch: only mixtures need it

    try:
        shares, train_tokens = realized_shares(mixture)
    except BluesError as exc:
        report.add(mixture_file, str(exc))
        return []
    rows = []
    for number, (entry, share, tokens) in enumerate(zip(mixture["sources"], shares, train_tokens)):
        rows.append({"path": entry["path"], "target": entry["weight"], "realized": round(share, 6),
                     "tokens_per_pass": entry["tokens"], "train_tokens": tokens,
                     "repeat": round(entry["tokens"] / max(tokens, 1), 4)})
        if abs(share - entry["weight"]) > SHARE_TOLERANCE:
            report.add(mixture_file, f"sources[{number}] realizes {share:.4f}, target {entry['weight']:.4f}")
    return rows


def format_report(report: VerifyReport) -> str:
    lines = report.problem_lines()
    if report.datasets:
        lines += ["", f"{'dataset':<40} {'docs':>8} {'tokens (all)':>12} {'B/tok':>6}  "
                  "doc tokens p0/p10/p50/p90/p99/p100"]
        for d in report.datasets:
            pct = "/".join(str(v) for v in d["doc_tokens_percentiles"].values())
            lines.append(f"{d['path'][-40:]:<40} {d['docs']:>8,} {d['tokens']:>12,} "
                         f"{d['stored_bytes_per_token']:>6.3f}  {pct}")
    for m in report.mixtures:
        lines += ["", f"mixture {m['path']} ({m['strategy']})",
                  f"{'source':<40} {'target':>7} {'realized':>8} {'tokens/pass':>12} {'train split':>12} {'repeat':>7}"]
        for s in m["sources"]:
            lines.append(f"{s['path'][-40:]:<40} {s['target']:>7.4f} {s['realized']:>8.4f} "
                         f"{s['tokens_per_pass']:>12,} {s['train_tokens']:>12,} {s['repeat']:>7.2f}")
        split = sum(s["train_tokens"] for s in m["sources"])
        lines += [f"{'total':<40} {'':>7} {'':>8} {m['total_tokens']:>12,} {split:>12,}",
                  "tokens/pass: training tokens drawn per pass, repeats included (as blues merge prints); "
                  "train split: the tokens of a source's training documents; tokens (all): a whole store, "
                  "validation documents included"]
    verdict = "OK: no problems" if report.ok else f"FAILED: {len(report.problems)} problem(s)"
    return "\n".join(lines + ["", verdict]).lstrip("\n")


def flag_parser() -> argparse.ArgumentParser:
    parser = command_line.flag_parser("blues verify", __doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="token stores and mixtures")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    executor.add_flags(parser, "the chunks' checks (local: a thread per core)")
    return parser


def chunk_runner(name: str, ray_address: str | None):
    """None for local (threads, no processes: hashing and decompressing release the GIL), else the executor."""
    if name == "local" and ray_address is None:
        return None
    return executor.make_executor(name, None, ray_address)


def main(argv: list[str]) -> int:
    args = flag_parser().parse_args(argv)
    report = verify_paths(args.paths, progress=True, runner=chunk_runner(args.executor, args.ray_address))
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    from blues_train.io.command_line import run_command

    sys.exit(run_command(main, sys.argv[1:]))
