"""`blues dedup`: exact and near-duplicate documents across token stores, every removal explained.

The result folder holds `dedup.json` (inputs and their fingerprints, parameters, counts per
dataset and reason, its own fingerprint), written last, and `removals-<sha>.parquet`, one
row per removed document: who it is (dataset, raw file label and sha256, record index, as
`blues lineage` names documents), why (`exact` | `near`), the kept document it duplicates
and their estimated Jaccard. `blues merge --dedup DIR` applies it.

How (signatures: `blues_train.mixture.minhash`):
1. Signatures: each chunk's documents' exact digests, MinHash signatures and band hashes
   go to `signatures/<parameters>/<chunk sha256>.arrow`, computed in `--workers` processes or
   as Ray tasks (`--executor ray`), each reading its chunk; this process writes the files.
   A file there is whole (written atomically), so a killed run resumes without redoing
   finished chunks, and a chunk shared by runs is hashed once.
2. Buckets: for the exact digest and for each band, one pass over that column only, split
   into hash-range partitions of at most PARTITION_DOCS documents; documents sharing a key
   in a partition are candidates, each against the first (in document order).
3. Candidate pairs are confirmed (exact: the whole 128-bit digest; near: the estimated
   Jaccard of their signatures at least --threshold), then joined into clusters
   (union-find). A cluster keeps its first document in the order of --datasets, then the
   store's order (prepare writes a store's documents by raw file, then record index), so
   the result depends on no executor or worker count.
Memory: a partition holds at most PARTITION_DOCS (key, document) pairs (16 bytes each), the
candidate pairs and the signatures of the documents in them (1 KiB each); no chunk's
tokens are held beside its own signature work.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from blues_train.data import doc_index, store, tokenizer
from blues_train.io import command_line, executor, storage
from blues_train.io.atomic import write_atomic
from blues_train.io.errors import BluesError
from blues_train.io.folder_lock import check_held, exclusive_writer
from blues_train.mixture import minhash

DEDUP_FILE = "dedup.json"
KIND = "dedup"
FORMAT_VERSION = 1
DEFAULT_THRESHOLD = 0.8
PARTITION_DOCS = 1 << 24
REASONS = ("exact", "near")
SAMPLE_CHARS = 200


def dedup(datasets, out_dir, *, exact=True, near=True, threshold=DEFAULT_THRESHOLD, workers=1,
          say=print, executor_name="local", ray_address=None) -> dict:
    """Find the duplicates among the token stores `datasets`; write and return `dedup.json`."""
    check_options(exact, near, threshold, workers, out_dir)
    runner = executor.make_executor(executor_name, workers if executor_name == "local" else None, ray_address)
    paths = [storage.path(d) for d in datasets]
    manifests = read_inputs(paths)
    out = Path(out_dir)
    with exclusive_writer(out):
        chunks = chunk_list(paths, manifests)
        folder = out / "signatures" / parameters_key()
        compute_signatures(chunks, folder, runner, say)
        files = [folder / f"{chunk['sha256']}.arrow" for chunk in chunks]
        pairs = candidate_pairs(files, exact, near, threshold)
        removals = removal_rows(files, chunks, paths, manifests, pairs)
        record = write_result(out, paths, manifests, removals, exact, near, threshold)
    say(summary(record, out))
    return record


def check_options(exact: bool, near: bool, threshold: float, workers: int, out_dir) -> None:
    if not (exact or near):
        raise BluesError("nothing to find: give --exact, --near or neither (both)")
    if not 0 < threshold <= 1:
        raise BluesError(f"--threshold must be in (0, 1], got {threshold}")
    if workers < 1:
        raise BluesError(f"--workers must be a positive integer, got {workers}")
    if storage.is_remote(out_dir):
        raise BluesError(f"--output {out_dir}: dedup results are written to a local folder")
    storage.check_output_folder(out_dir, "--output")


def read_inputs(paths: list) -> list[dict]:
    if not paths:
        raise BluesError("no datasets given; pass --datasets DIR [DIR ...]")
    manifests = [store.read_manifest(path) for path in paths]
    seen = {}
    for path, manifest in zip(paths, manifests):
        if manifest["fingerprint"] in seen:
            raise BluesError(f"--datasets {path}: the same store as {seen[manifest['fingerprint']]}; list it once")
        seen[manifest["fingerprint"]] = path
    return manifests


def chunk_list(paths: list, manifests: list[dict]) -> list[dict]:
    """Every chunk of every dataset, in document order: its dataset, number, path, sha256."""
    return [{"dataset": d, "number": n, "path": store.chunk_path(path, chunk), "sha256": chunk["sha256"]}
            for d, (path, manifest) in enumerate(zip(paths, manifests))
            for n, chunk in enumerate(manifest["chunks"])]


def parameters_key() -> str:
    return hashlib.sha256(json.dumps(minhash.parameters(), sort_keys=True).encode()).hexdigest()[:16]


def compute_signatures(chunks: list[dict], folder: Path, runner, say) -> None:
    """A signature file for every chunk that has none yet (the resumable, parallel part): the
    executor's tasks compute them, this process writes each as it comes."""
    todo = sorted({(str(c["path"]), c["sha256"]) for c in chunks
                   if not (folder / f"{c['sha256']}.arrow").is_file()})
    if len(todo) < len(chunks):
        say(f"{folder}: {len(chunks) - len(todo)} of {len(chunks)} chunk signature(s) already computed")
    for position, data in runner.run(chunk_signature, todo):
        write_atomic(folder / f"{todo[position][1]}.arrow", data)


def chunk_signature(chunk_path: str, sha256: str) -> bytes:
    """The signature file of one chunk (checked against its manifest sha256), as bytes."""
    data = storage.read_bytes(chunk_path)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise BluesError(f"{chunk_path}: its sha256 is not the manifest's; run `blues verify` and prepare it again")
    table = store.read_chunk(chunk_path, data)
    parts = [store.integers(batch.flatten()) for batch in table.column("tokens").chunks]  # views, no combined copy
    tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)
    offsets = np.concatenate([[0], np.cumsum(store.doc_lengths(table), dtype=np.int64)])
    rows, signature = minhash.signatures(tokens, offsets)
    digests = minhash.exact_digests(tokens, offsets, rows)
    bands = minhash.band_hashes(signature)
    columns = [pa.array(rows), pa.array(digests[:, 0]), pa.array(digests[:, 1]),
               pa.FixedSizeListArray.from_arrays(pa.array(signature.ravel()), minhash.PERMUTATIONS)]
    columns += [pa.array(bands[:, b]) for b in range(minhash.BANDS)]
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, minhash.SIGNATURE_SCHEMA) as writer:
        writer.write_table(pa.Table.from_arrays(columns, schema=minhash.SIGNATURE_SCHEMA))
    return sink.getvalue().to_pybytes()


def read_columns(file: Path, names: list[str]) -> pa.Table:
    try:
        with pa.memory_map(str(file)) as source:
            schema = pa.ipc.open_file(source).schema
            fields = [schema.get_field_index(name) for name in names]
            return pa.ipc.open_file(source, options=pa.ipc.IpcReadOptions(included_fields=fields)).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise BluesError(f"{file}: not a readable signature file ({exc}); delete it and run again") from None


def document_numbers(files: list[Path]) -> list[int]:
    """The number of each file's first document in the global document order."""
    counts = [read_columns(f, ["row"]).num_rows for f in files]
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()


def candidate_pairs(files: list[Path], exact: bool, near: bool, threshold: float) -> dict:
    """Confirmed duplicate pairs {(kept candidate, other): estimated Jaccard}, by global
    document number (file order, then row order within a file)."""
    firsts = document_numbers(files)
    keys = (["exact_hi"] if exact else []) + ([minhash.band_column(b) for b in range(minhash.BANDS)] if near else [])
    pairs: set[tuple[int, int]] = set()
    for key in keys:
        pairs |= bucket_pairs(files, firsts, key)
    return confirmed(files, firsts, sorted(pairs), exact, near, threshold)


def bucket_pairs(files: list[Path], firsts: list[int], key: str) -> set[tuple[int, int]]:
    """Documents sharing `key`'s value, each paired with the first of its bucket; the key
    space is cut into ranges of at most PARTITION_DOCS documents, one held at a time."""
    partitions = max(1, -(-firsts[-1] // PARTITION_DOCS))
    pairs = set()
    for part in range(partitions):
        values, docs = [], []
        for file, first in zip(files, firsts):
            column = store.integers(read_columns(file, [key]).column(0))
            mine = np.flatnonzero(column % np.uint64(partitions) == part)
            values.append(column[mine])
            docs.append(mine + first)
        values, docs = np.concatenate(values), np.concatenate(docs)
        order = np.lexsort((docs, values))
        values, docs = values[order], docs[order]
        group_start = np.r_[True, values[1:] != values[:-1]]
        heads = docs[np.maximum.accumulate(np.where(group_start, np.arange(len(docs)), 0))]
        pairs.update(zip(heads[~group_start].tolist(), docs[~group_start].tolist()))
    return pairs


def gather(files: list[Path], firsts: list[int], docs: np.ndarray, names: list[str]) -> dict:
    """Columns `names` of the global documents `docs` (sorted, unique), one file at a time."""
    found = {name: [] for name in names}
    for number, file in enumerate(files):
        lo, hi = np.searchsorted(docs, [firsts[number], firsts[number + 1]])
        if lo == hi:
            continue
        table = read_columns(file, names)
        for name in names:
            column = table.column(name).combine_chunks()
            if name == "signature":
                values = store.integers(column.values).reshape(-1, minhash.PERMUTATIONS)
            else:
                values = store.integers(column)
            found[name].append(values[docs[lo:hi] - firsts[number]])
    return {name: np.concatenate(parts) for name, parts in found.items()}


def confirmed(files, firsts, pairs: list, exact: bool, near: bool, threshold: float) -> dict:
    if not pairs:
        return {}
    pairs = np.array(pairs, dtype=np.int64)
    docs = np.unique(pairs)
    columns = gather(files, firsts, docs, ["exact_hi", "exact_lo", "signature"])
    a, b = np.searchsorted(docs, pairs[:, 0]), np.searchsorted(docs, pairs[:, 1])
    same = (columns["exact_hi"][a] == columns["exact_hi"][b]) & (columns["exact_lo"][a] == columns["exact_lo"][b])
    jaccard = minhash.estimated_jaccard(columns["signature"][a], columns["signature"][b])
    keep = (same & exact) | ((jaccard >= threshold) & near)
    jaccard = np.where(same, 1.0, jaccard)
    return {(int(x), int(y)): float(j) for (x, y), j in zip(pairs[keep], jaccard[keep])}


def clusters(pairs: dict) -> dict[int, int]:
    """{document: the first document of its cluster} for every document that is not first."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    for x, y in pairs:
        rx, ry = root(x), root(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    return {doc: root(doc) for doc in parent if root(doc) != doc}


def removal_rows(files, chunks, paths, manifests, pairs: dict) -> pa.Table:
    """The removal table: each removed document, why, and the document it duplicates."""
    kept_by = clusters(pairs)
    removed = np.array(sorted(kept_by), dtype=np.int64)
    kept = np.array([kept_by[d] for d in removed.tolist()], dtype=np.int64)
    firsts = document_numbers(files)
    both = np.unique(np.concatenate([removed, kept]))
    columns = gather(files, firsts, both, ["row", "exact_hi", "exact_lo", "signature"]) if len(both) else {}
    r, k = np.searchsorted(both, removed), np.searchsorted(both, kept)
    same = np.zeros(0, bool) if not len(both) else (
        (columns["exact_hi"][r] == columns["exact_hi"][k]) & (columns["exact_lo"][r] == columns["exact_lo"][k]))
    jaccard = np.zeros(0) if not len(both) else np.where(
        same, 1.0, minhash.estimated_jaccard(columns["signature"][r], columns["signature"][k]))
    rows = columns.get("row", np.zeros(0, np.int32))
    who = identities(chunks, paths, manifests, firsts, both, rows)
    gone, kept_doc = [who[i] for i in r.tolist()], [who[i] for i in k.tolist()]
    return pa.table({
        "dataset": [w["dataset"] for w in gone], "source": [w["source"] for w in gone],
        "sha256": [w["sha256"] for w in gone], "index": pa.array([w["index"] for w in gone], pa.int64()),
        "reason": pa.array(np.where(same, "exact", "near").tolist(), pa.string()),
        "kept_dataset": [w["dataset"] for w in kept_doc], "kept_source": [w["source"] for w in kept_doc],
        "kept_sha256": [w["sha256"] for w in kept_doc],
        "kept_index": pa.array([w["index"] for w in kept_doc], pa.int64()),
        "jaccard": pa.array(np.round(jaccard, 4), pa.float64()),
        "dataset_fingerprint": [w["fingerprint"] for w in gone],
        "chunk": pa.array([w["chunk"] for w in gone], pa.int32()),
        "row": pa.array([w["row"] for w in gone], pa.int32()),
        "tokens": pa.array([w["tokens"] for w in gone], pa.int64()),
    }, schema=REMOVAL_SCHEMA)


REMOVAL_SCHEMA = pa.schema([
    ("dataset", pa.string()), ("source", pa.string()), ("sha256", pa.string()), ("index", pa.int64()),
    ("reason", pa.string()), ("kept_dataset", pa.string()), ("kept_source", pa.string()),
    ("kept_sha256", pa.string()), ("kept_index", pa.int64()), ("jaccard", pa.float64()),
    ("dataset_fingerprint", pa.string()), ("chunk", pa.int32()), ("row", pa.int32()), ("tokens", pa.int64()),
])


def identities(chunks, paths, manifests, firsts, docs: np.ndarray, rows: np.ndarray) -> list[dict]:
    """Who the global documents `docs` (rows: their rows in their chunks) are, reading the
    `source`, `index` and lengths of their chunks only."""
    out = []
    files = np.searchsorted(firsts, docs, side="right") - 1
    table = number = None
    for file, row in zip(files.tolist(), rows.tolist()):
        chunk = chunks[file]
        if number != file:
            table, number = store.read_chunk(chunk["path"]), file
            labels, indices, lengths = table.column("source"), table.column("index"), store.doc_lengths(table)
        manifest = manifests[chunk["dataset"]]
        label = labels[row].as_py()
        sha256 = next(s["sha256"] for s in manifest["sources"] if s["path"] == label)
        out.append({"dataset": storage.display(paths[chunk["dataset"]]), "source": label, "sha256": sha256,
                    "index": indices[row].as_py(), "fingerprint": manifest["fingerprint"],
                    "chunk": chunk["number"], "row": row, "tokens": int(lengths[row])})
    return out


def write_result(out: Path, paths, manifests, removals: pa.Table, exact: bool, near: bool,
                 threshold: float) -> dict:
    """The removal table, then `dedup.json` naming it (the commit); the table it replaces goes."""
    sink = io.BytesIO()
    pq.write_table(removals, sink)
    data = sink.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    name = f"removals-{digest[:16]}.parquet"
    write_atomic(out / name, data)
    previous = (out / DEDUP_FILE).is_file() and read_result(out)
    record = {
        "kind": KIND, "format_version": FORMAT_VERSION,
        "inputs": [{"path": storage.display(p), "fingerprint": m["fingerprint"], "docs": m["totals"]["docs"],
                    "tokens": m["totals"]["tokens"]} for p, m in zip(paths, manifests)],
        "parameters": {"exact": exact, "near": near, "threshold": threshold, **minhash.parameters()},
        "counts": counts(paths, manifests, removals),
        "removals": {"file": name, "sha256": digest, "rows": removals.num_rows},
    }
    record["fingerprint"] = result_fingerprint(record)
    check_held(out)
    storage.write_json(out / DEDUP_FILE, record)
    if previous and previous["removals"]["file"] != name:
        (out / previous["removals"]["file"]).unlink(missing_ok=True)
    return record


def counts(paths, manifests, removals: pa.Table) -> list[dict]:
    """Per dataset: documents removed for each reason, and their tokens."""
    fingerprints = np.asarray(removals.column("dataset_fingerprint").to_pylist(), dtype=object)
    reasons = np.asarray(removals.column("reason").to_pylist(), dtype=object)
    tokens = store.integers(removals.column("tokens"))
    rows = []
    for path, manifest in zip(paths, manifests):
        mine = fingerprints == manifest["fingerprint"]
        rows.append({"dataset": storage.display(path), **{r: int((mine & (reasons == r)).sum()) for r in REASONS},
                     "removed_tokens": int(tokens[mine].sum())})
    return rows


def result_fingerprint(record: dict) -> str:
    identity = {key: record[key] for key in ("inputs", "parameters", "counts", "removals")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def read_result(folder) -> dict:
    """`dedup.json` of a dedup result folder; BluesError if absent, broken or edited."""
    path = storage.path(folder) / DEDUP_FILE
    if not path.is_file():
        raise BluesError(f"{path}: no dedup result here; create one with `blues dedup`")
    record = storage.read_json(path)
    if not isinstance(record, dict) or record.get("kind") != KIND or record.get("format_version") != FORMAT_VERSION:
        raise BluesError(f"{path}: not a dedup result (kind {KIND!r}, format_version {FORMAT_VERSION}); "
                         "run `blues dedup` again")
    try:
        fingerprint = result_fingerprint(record)
        storage.inside(folder, record["removals"]["file"], f"{path}: removals.file", "run `blues dedup` again")
    except (KeyError, TypeError):
        raise BluesError(f"{path}: fields missing; run `blues dedup` again") from None
    if fingerprint != record.get("fingerprint"):
        raise BluesError(f"{path}: fingerprint does not match its contents: edited after `blues dedup`; run it again")
    return record


def read_removals(folder, record: dict) -> pa.Table:
    """The removal table `record` names, checked against its sha256."""
    path = storage.path(folder) / record["removals"]["file"]
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise BluesError(f"{path}: missing; run `blues dedup` again") from None
    if hashlib.sha256(data).hexdigest() != record["removals"]["sha256"]:
        raise BluesError(f"{path}: changed after `blues dedup` (sha256 differs from dedup.json); run it again")
    return pq.read_table(pa.BufferReader(data))


def summary(record: dict, out: Path) -> str:
    lines = [f"{'dataset':<48} {'exact':>8} {'near':>8} {'tokens':>12}"]
    for row in record["counts"]:
        lines.append(f"{row['dataset'][-48:]:<48} {row['exact']:>8,} {row['near']:>8,} {row['removed_tokens']:>12,}")
    lines.append(f"wrote {out / DEDUP_FILE} and {record['removals']['file']} ({record['removals']['rows']} removal(s), "
                 f"fingerprint {record['fingerprint'][:16]})")
    return "\n".join(lines)


def removal_sample(folder, record: dict, size: int = 5) -> list[dict]:
    """`size` removals spread evenly over the removal table, each with the opening
    SAMPLE_CHARS characters of the removed (`text`) and of the kept document (`kept_text`):
    what a person reads to judge the threshold."""
    table = read_removals(folder, record)
    stores = {entry["fingerprint"]: entry["path"] for entry in record["inputs"]}
    picked = np.unique(np.linspace(0, table.num_rows - 1, min(size, table.num_rows)).astype(np.int64))
    return [{**row, "text": opening(stores[row["dataset_fingerprint"]], row["source"], row["index"]),
             "kept_text": opening(row["kept_dataset"], row["kept_source"], row["kept_index"])}
            for row in table.take(picked).to_pylist()]


def opening(store_dir, source: str, index: int) -> str:
    """The first SAMPLE_CHARS characters of record `index` of raw file `source` in a store,
    found through the store's document index (blues_train.data.doc_index)."""
    manifest = store.read_manifest(store_dir)
    position = next((i for i, s in enumerate(manifest["sources"]) if s["path"] == source), None)
    for number, chunk in enumerate(manifest["chunks"] if position is not None else []):
        records = doc_index.chunk_index(store_dir, manifest, number)
        rows = np.flatnonzero((records["source"] == position) & (records["index"] == index))
        if len(rows):
            path = store.chunk_path(store_dir, chunk)
            tokens = store.integers(store.read_chunk(path).column("tokens")[int(rows[0])].values)
            return tokenizer.decode(tokens[:SAMPLE_CHARS])[:SAMPLE_CHARS]
    raise BluesError(f"{store_dir}: holds no record {index} of {source}, which the dedup result names; "
                     "run `blues dedup` again")


# Applying a result to a mixture: merge records it, the loader drops what it removed.

def mixture_record(folder, fingerprints: list[str]) -> tuple[dict, dict]:
    """What `mixture.json` records of the dedup result in `folder` for sources of these
    store fingerprints, and its dedup.json; BluesError if one was not an input of it."""
    record = read_result(folder)
    read_removals(folder, record)
    inputs = {entry["fingerprint"] for entry in record["inputs"]}
    for fingerprint in fingerprints:
        if fingerprint not in inputs:
            raise BluesError(f"--dedup {folder}: a dataset (fingerprint {fingerprint[:16]}) was not among its "
                             "--datasets, or changed since; run `blues dedup` again with every dataset")
    return {"path": storage.display(folder), "fingerprint": record["fingerprint"]}, record


def removal_counts(record: dict, fingerprint: str) -> dict:
    """Documents and tokens the result removes from the store of `fingerprint`."""
    for row, entry in zip(record["counts"], record["inputs"]):
        if entry["fingerprint"] == fingerprint:
            return {"docs": sum(row[reason] for reason in REASONS), "tokens": row["removed_tokens"]}
    return {"docs": 0, "tokens": 0}


def current_result(mixture: dict) -> dict:
    """The dedup result a mixture was merged with; BluesError if it changed since."""
    entry = mixture["dedup"]
    record = read_result(entry["path"])
    if record["fingerprint"] != entry["fingerprint"]:
        raise BluesError(f"{storage.path(entry['path']) / DEDUP_FILE}: fingerprint {record['fingerprint'][:16]} "
                         f"differs from {entry['fingerprint'][:16]} recorded in the mixture: the dedup result "
                         "changed after merging; run `blues merge` again")
    return record


def removal_of(mixture: dict, fingerprint: str, source: str, index: int) -> dict | None:
    """The removal-table row of record `index` of raw file `source` in the store of
    `fingerprint`, if the mixture's dedup result removed it."""
    if not mixture.get("dedup"):
        return None
    table = read_removals(mixture["dedup"]["path"], current_result(mixture))
    mine = ((np.asarray(table.column("dataset_fingerprint").to_pylist(), dtype=object) == fingerprint)
            & (np.asarray(table.column("source").to_pylist(), dtype=object) == source)
            & (store.integers(table.column("index")) == index))
    found = np.flatnonzero(mine)
    return table.slice(int(found[0]), 1).to_pylist()[0] if len(found) else None


def removed_rows(mixture: dict) -> list[dict[int, np.ndarray]]:
    """Per mixture source: {chunk number in its store: rows removed}; empty without dedup."""
    if not mixture.get("dedup"):
        return [{} for _ in mixture["sources"]]
    record = current_result(mixture)
    table = read_removals(mixture["dedup"]["path"], record)
    fingerprints = np.asarray(table.column("dataset_fingerprint").to_pylist(), dtype=object)
    chunk, row = store.integers(table.column("chunk")), store.integers(table.column("row"))
    out = []
    for entry in mixture["sources"]:
        mine = fingerprints == entry["fingerprint"]
        out.append({int(c): row[mine & (chunk == c)] for c in np.unique(chunk[mine]).tolist()})
    return out


def flag_parser() -> argparse.ArgumentParser:
    parser = command_line.flag_parser("blues dedup", "Find exact and near-duplicate documents across token stores.")
    parser.add_argument("--datasets", nargs="+", required=True, help="token store folders, in keep order")
    parser.add_argument("--output", required=True, help="the dedup result folder")
    parser.add_argument("--exact", action="store_true", help="find exact copies (default: both kinds)")
    parser.add_argument("--near", action="store_true", help="find near copies (default: both kinds)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="estimated Jaccard of token 5-gram shingles at which a near copy is removed")
    executor.add_flags(parser, "chunk signatures are computed")
    parser.add_argument("--workers", type=int, default=1, help="processes computing chunk signatures (local)")
    return parser


def main(argv: list[str]) -> int:
    args = flag_parser().parse_args(argv)
    both = not (args.exact or args.near)
    dedup(args.datasets, args.output, exact=args.exact or both, near=args.near or both,
          threshold=args.threshold, workers=args.workers, executor_name=args.executor,
          ray_address=args.ray_address)
    return 0


if __name__ == "__main__":
    sys.exit(command_line.run_command(main, sys.argv[1:]))
