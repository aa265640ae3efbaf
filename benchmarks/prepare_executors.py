"""`blues prepare` through its executors: local vs Ray with 1 and 2 workers, on plain JSONL cut
into work items, and the parts of a run that do not spread (for docs/benchmarks.md's model).

Measured, on the same corpus (the sample corpus' code and prose text as JSONL, repeated to
--mb MB; documents renamed per copy so no chunk repeats):
- tokens/s end to end for `--executor local --workers 1|2` and `--executor ray --workers 1|2`
  (Ray started once beforehand, its start-up reported apart), and each store's fingerprint
  (they must all be equal);
- per-task overhead: a no-op task through each executor, 200 times;
- the driver's share: its own CPU seconds (planning, hashing the sources is a task, journaling,
  the manifest) against the workers' total, for the Ray runs;
- what stays serial per input file: the sha256 of the file (one task reads it all) and the
  line-break count before its ranges (spread over tasks), in MB/s, and the time to plan the items
  of a 10 GB JSONL (no read) and of a 10 GB JSONL.zst (one item: a single zstd frame cannot be cut).

    PYTHONPATH=. .venv/bin/python benchmarks/prepare_executors.py [--mb 40] [--rounds 2]
        [--executors local,ray] [--workers 1,2] [--format jsonl|csv] [--item_mb 4]
        [--json benchmarks/results/prepare_executors.json]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from blues_train.data import work_items
from blues_train.data.prepare import prepare_dataset
from blues_train.data.sample_corpus import write_sample_corpus
from blues_train.data.sources import Source, SkipLog, discover_sources, iter_documents
from blues_train.io.executor import LocalExecutor, RayExecutor

ITEM_BYTES = 4 << 20  # many items on a corpus of tens of MB (the default, 64 MiB, is for real corpora)


def noop(n: int) -> int:
    return n


def write_corpus(folder: Path, megabytes: int, fmt: str = "jsonl") -> Path:
    """One JSONL or CSV file (a `text` column, quoted where a document holds line breaks,
    commas or quotes: most of them) of about `megabytes`."""
    written = write_sample_corpus(folder / "sample", max_mb=4)
    sources = discover_sources([p for paths in written.values() for p in paths], glob="**/*")
    texts = [doc.text for doc in iter_documents(sources, "text", SkipLog())]
    out = folder / f"corpus.{fmt}"
    size, copy = 0, 0
    with open(out, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        if fmt == "csv":
            writer.writerow(["id", "text"])
        while size < megabytes << 20:
            for number, text in enumerate(texts):
                if fmt == "csv":
                    size += writer.writerow([f"{copy}-{number}", f"copy {copy}\n{text}"])
                else:
                    line = json.dumps({"text": f"copy {copy}\n{text}"}) + "\n"
                    size += fh.write(line)
            copy += 1
    return out


def timed_prepare(corpus: Path, out: Path, executor_name: str, workers: int,
                  item_bytes: int = ITEM_BYTES) -> tuple[float, float, dict]:
    cpu, start = time.process_time(), time.perf_counter()
    manifest = prepare_dataset([corpus], out, workers=workers, executor_name=executor_name, progress=False,
                               item_bytes=item_bytes, tokenizer_engine="auto")
    return time.perf_counter() - start, time.process_time() - cpu, manifest


def task_overhead(runner, n: int = 200) -> float:
    start = time.perf_counter()
    results = dict(runner.run(noop, [(i,) for i in range(n)]))
    assert len(results) == n
    return (time.perf_counter() - start) / n


def serial_rates(corpus: Path) -> dict:
    size = corpus.stat().st_size
    source = Source(corpus, corpus.suffix[1:], corpus.name)
    start = time.perf_counter()
    with open(corpus, "rb") as fh:
        hashlib.file_digest(fh, "sha256")
    sha = time.perf_counter() - start
    start = time.perf_counter()
    work_items.count_range(work_items.Piece(source, 0, size))
    count = time.perf_counter() - start
    start = time.perf_counter()
    ten_gb = 10 << 30
    items = work_items.plan_items([source], [ten_gb])
    plan = time.perf_counter() - start
    zst = Source(corpus, "jsonl.zst", corpus.name)
    start = time.perf_counter()
    zst_items = work_items.plan_items([zst], [ten_gb])
    return {"sha256_MB_per_s": size / sha / 1e6, "count_newlines_MB_per_s": size / count / 1e6,
            "plan_10GB_jsonl_s": plan, "items_10GB_jsonl": len(items),
            "plan_10GB_jsonl_zst_s": time.perf_counter() - start, "items_10GB_jsonl_zst": len(zst_items)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--executors", default="local,ray", help="comma-separated: local, ray")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--format", choices=["jsonl", "csv"], default="jsonl", help="the corpus file's format")
    parser.add_argument("--item_mb", type=int, default=ITEM_BYTES >> 20,
                        help="work item size; larger than the corpus = the whole file one item (as before it was cut)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    executors, worker_counts = args.executors.split(","), [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = write_corpus(work, args.mb, args.format)
        found = {"machine": {"cores": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version()},
                 "corpus_MB": corpus.stat().st_size / 1e6, "format": args.format, "item_bytes": args.item_mb << 20}
        found["task_overhead_ms"] = {"local, 2 processes": 1e3 * task_overhead(LocalExecutor(2))}
        if "ray" in executors:
            start = time.perf_counter()
            ray_runner = RayExecutor(None, None)
            found["ray_start_s"] = time.perf_counter() - start
            found["task_overhead_ms"]["ray"] = 1e3 * task_overhead(ray_runner)
        runs, fingerprints = {}, set()
        for round_number in range(args.rounds):
            for name, workers in [(e, w) for e in executors for w in worker_counts]:
                key = f"{name} --workers {workers}"
                wall, cpu, manifest = timed_prepare(corpus, work / f"{key}-{round_number}".replace(" ", "_"),
                                                    name, workers, args.item_mb << 20)
                fingerprints.add(manifest["fingerprint"])
                runs.setdefault(key, []).append({"wall_s": wall, "driver_cpu_s": cpu,
                                                 "tokens": manifest["totals"]["tokens"]})
        assert len(fingerprints) == 1, "the executors made different stores"
        found["items"] = len({c["file"].split("-")[1] for c in manifest["chunks"]})
        found["runs"] = {key: {"best_tokens_per_s": max(r["tokens"] / r["wall_s"] for r in rs),
                               "median_wall_s": statistics.median(r["wall_s"] for r in rs),
                               "driver_cpu_share": statistics.median(r["driver_cpu_s"] / r["wall_s"] for r in rs)}
                         for key, rs in runs.items()}
        found["serial"] = serial_rates(corpus)
    base = found["runs"]["local --workers 1"]["best_tokens_per_s"]
    ray_start = f"; Ray start {found['ray_start_s']:.1f} s" if "ray_start_s" in found else ""
    print(f"corpus {found['corpus_MB']:.1f} MB of {args.format} in {found['items']} work items{ray_start}")
    for key, run in found["runs"].items():
        print(f"{key:<22} best {run['best_tokens_per_s'] / 1e6:6.2f} M tokens/s  ({run['best_tokens_per_s'] / base:.2f}x local 1)"
              f"  driver CPU {100 * run['driver_cpu_share']:.0f}% of wall")
    print("per-task overhead: " + ", ".join(f"{k} {v:.2f} ms" for k, v in found["task_overhead_ms"].items()))
    print("serial per file: " + ", ".join(f"{k} {v:.3g}" for k, v in found["serial"].items()))
    print(f"cores {found['machine']['cores']}, load average {found['machine']['load_average']}")
    if args.json:
        Path(args.json).write_text(json.dumps(found, indent=1) + "\n")


if __name__ == "__main__":
    main()
