"""`blues dedup` quality and speed on planted duplicates (the cases of tests/test_dedup.py, larger).

Two stores of `--docs` random-word documents each; B holds exact copies of some of A's
documents, near copies (a date header and 2 of 50 sentences rewritten: true shingle
Jaccard >= 0.85, measured) and pairs about half rewritten (Jaccard <= 0.6, must stay); A
holds documents that share only a long licence header. Reported: recall on exact and on
near copies, precision (share of removals that are planted copies), signature throughput
on one core (tokens/s, best of 3 per chunk: in memory, and of the whole per-chunk job), peak
resident memory of the whole run, and the time for 1B tokens at that rate, extrapolated to
1T tokens on N workers.

    .venv/bin/python benchmarks/dedup_quality.py [--docs 2000] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_dedup import LICENCE, document, edited  # noqa: E402 (the same planted cases)

from blues_train.data import store
from blues_train.data.prepare import prepare_dataset  # noqa: E402
from blues_train.mixture import dedup, minhash  # noqa: E402


def planted(root: Path, n: int) -> tuple[dict, dict]:
    rng = random.Random(26)
    a = [document(rng) for _ in range(n)]
    b = [document(rng) for _ in range(n)]
    expected = {}
    for original in range(0, n // 20):
        b.append(list(a[original])); expected[("B", len(b) - 1)] = ("A", original, "exact")
    for original in range(n // 20, n // 4):
        b.append(edited(a[original], rng, 2)); expected[("B", len(b) - 1)] = ("A", original, "near")
    for original in range(n // 4, n // 4 + n // 20):
        b.append(edited(a[original], rng, 22))
    for _ in range(n // 20):
        a.append([LICENCE] + document(rng, 12))
    stores = {}
    for name, docs in (("A", a), ("B", b)):
        raw = root / f"{name}.jsonl"
        raw.write_text("".join(json.dumps({"text": " ".join(doc)}) + "\n" for doc in docs))
        stores[name] = root / f"store_{name}"
        prepare_dataset([raw], stores[name], workers=1, progress=False)
    return stores, expected


def signature_rate(stores: dict, out: Path) -> tuple[float, float, int]:
    """Tokens/s on one core (best of 3 per chunk): in memory (`minhash.signatures`,
    `exact_digests`, `band_hashes` of decoded tokens), and of the whole per-chunk job
    (`dedup.chunk_signature_file`: read, sha256 check, decompress, signatures, write)."""
    best, best_file, tokens = 0.0, 0.0, 0
    for path in stores.values():
        for chunk in store.read_manifest(path)["chunks"]:
            table = store.read_chunk(store.chunk_path(path, chunk))
            ids = table.column("tokens").combine_chunks().values.to_numpy()
            offsets = np.concatenate([[0], np.cumsum(store.doc_lengths(table))])
            times, file_times = [], []
            for _ in range(3):
                start = time.perf_counter()
                rows, signature = minhash.signatures(ids, offsets)
                minhash.exact_digests(ids, offsets, rows)
                minhash.band_hashes(signature)
                times.append(time.perf_counter() - start)
                start = time.perf_counter()
                dedup.chunk_signature_file(str(store.chunk_path(path, chunk)), chunk["sha256"], str(out))
                file_times.append(time.perf_counter() - start)
            best += min(times)
            best_file += min(file_times)
            tokens += len(ids)
    return tokens / best, tokens / best_file, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stores, expected = planted(root, args.docs)
        start = time.perf_counter()
        dedup.dedup([stores["A"], stores["B"]], root / "dedup", workers=args.workers, say=lambda *_: None)
        wall = time.perf_counter() - start
        record = dedup.read_result(root / "dedup")
        rows = dedup.read_removals(root / "dedup", record).to_pylist()
        removed = {(r["dataset"][-1], r["index"]): (r["kept_dataset"][-1], r["kept_index"]) for r in rows}
        rate, file_rate, tokens = signature_rate(stores, root / "signature.arrow")
    right = {k for k, v in removed.items() if k in expected and expected[k][:2] == v}
    for kind in ("exact", "near"):
        planted_kind = [k for k, v in expected.items() if v[2] == kind]
        print(f"recall {kind}: {sum(k in right for k in planted_kind) / len(planted_kind):.4f} "
              f"({sum(k in right for k in planted_kind)}/{len(planted_kind)})")
    print(f"precision: {len(right) / max(len(removed), 1):.4f} ({len(right)}/{len(removed)} removals)")
    print(f"tokens: {tokens:,}; whole dedup run {wall:.2f} s with {args.workers} worker(s)")
    print(f"signatures: {rate / 1e6:.2f}M tokens/s on one core in memory, "
          f"{file_rate / 1e6:.2f}M tokens/s per chunk file (read, check, decompress, write)")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"1B tokens: {1e9 / rate / 60:.1f} min on one core; 1T tokens on N workers: "
          f"{1e12 / rate / 3600:.0f} h / N (signatures; bucketing reads 33 uint64 columns per document)")


if __name__ == "__main__":
    main()
