"""Data preparation speed against a bare tiktoken loop, on the same real text.

(a) a bare loop of tiktoken `encode_ordinary` over the documents, already in memory;
(b) `prepare_dataset(..., workers=1)`, what `blues prepare --workers 1` runs, end to end
    (read, decompress, parse, tokenize, compress, hash, write; interpreter start-up aside);
(c) the same with `workers=2`.
Each is run `--rounds` times, interleaved; the best run (least disturbed by other
processes on a shared host) and the median are reported.

    .venv/bin/python benchmarks/prepare_throughput.py [--max_mb 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from blues_train import tokenizer
from blues_train.prepare import prepare_dataset
from blues_train.sample_corpus import write_sample_corpus
from blues_train.sources import SkipLog, discover_sources, iter_documents


def bare_loop(texts: list[str]) -> tuple[float, int]:
    encoding = tokenizer.get_encoding()
    start = time.perf_counter()
    tokens = sum(len(encoding.encode_ordinary(text)) for text in texts)
    return time.perf_counter() - start, tokens


def prepare_run(inputs, out: Path, workers: int) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    manifest = prepare_dataset(inputs, out, workers=workers, progress=False)
    return time.perf_counter() - start, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_mb", type=float, default=20.0, help="MB of code (prose adds what exists)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="blues-bench-"))
    try:
        corpus = write_sample_corpus(work / "corpus", max_mb=args.max_mb)
        inputs = corpus["code"] + corpus["prose"]
        texts = [d.text for d in iter_documents(discover_sources(inputs), "text", SkipLog())]
        megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        print(f"corpus: {len(texts)} documents, {megabytes:.1f} MB of text (stdlib code + prose)")
        times = {"a": [], "b": [], "c": []}
        for _ in range(args.rounds):
            seconds, tokens = bare_loop(texts)
            times["a"].append(seconds)
            seconds, one = prepare_run(inputs, work / "w1", 1)
            times["b"].append(seconds)
            seconds, two = prepare_run(inputs, work / "w2", 2)
            times["c"].append(seconds)
        assert one["totals"]["tokens"] == tokens and one["fingerprint"] == two["fingerprint"]
        report(times, tokens, megabytes, one)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(times: dict, tokens: int, megabytes: float, manifest: dict) -> None:
    best = {k: tokens / min(v) for k, v in times.items()}
    median = {k: tokens / statistics.median(v) for k, v in times.items()}
    names = {"a": "(a) bare encode_ordinary loop", "b": "(b) prepare --workers 1", "c": "(c) prepare --workers 2"}
    for key, name in names.items():
        print(f"{name:<30} best {best[key] / 1e6:5.2f} M tokens/s {megabytes / min(times[key]):5.1f} MB/s, "
              f"median {median[key] / 1e6:5.2f} M tokens/s (runs: {', '.join(f'{t:.2f}s' for t in times[key])})")
    for label, rate in (("best", best), ("median", median)):
        print(f"{label}: (b)/(a) = {rate['b'] / rate['a']:.2f}   (c)/(b) = {rate['c'] / rate['b']:.2f}")
    print(f"tokens {tokens:,}; stored {manifest['stats']['stored_bytes_per_token']} bytes/token "
          f"({len(manifest['chunks'])} chunks); input {manifest['stats']['input_bytes_per_token']} bytes/token")
    print(f"cores {os.cpu_count()}, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
