"""Loader speed on one core against a raw uint32 memmap, over the same real tokens.

(a) `PackedSequenceDataset` over a mixture of the sample corpus' code and prose stores:
    windows of seq_len + 1 ids as LongTensors, decompressed from the zstd Arrow chunks
    (a fresh loader each round, so every chunk is decompressed inside the timing);
(b) what Megatron and OLMo do: the same packed token stream (documents joined by EOT, in
    the loader's order) as a raw uint32 file, memory-mapped, cut into the same windows,
    each `torch.from_numpy(mm[a:b].astype(int64))`.
(c) the same mixture on object storage (a local moto S3 server, tests/s3_server.py; stores
    and mixture.json on s3://), read through the loader's local chunk cache: steady-state
    tokens/s with a warm cache against (a), and the cold start (an empty cache: the loader's
    index reads every chunk, fetched 8 at a time on 4 threads) to the first window, against
    the same cold start from local files.
Both produce identical windows (checked). The process is pinned to one core, with
pyarrow and torch on one thread; files are in the page cache for both. Each is run
`--rounds` times, interleaved; best and median are reported.

    .venv/bin/python benchmarks/loader_throughput.py [--max_mb 8] [--seq_len 2048] [--rounds 5] [--no_s3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from blues_train.data.prepare import prepare_dataset
from blues_train.data.sample_corpus import write_sample_corpus
from blues_train.io.chunk_files import ChunkFiles
from blues_train.mixture.loader import PackedSequenceDataset
from blues_train.mixture.merge import merge


def pin_one_core() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    torch.set_num_threads(1)


def build_mixture(work: Path, max_mb: float) -> Path:
    corpus = write_sample_corpus(work / "corpus", max_mb=max_mb)
    stores = [work / name for name in ("code", "prose")]
    for name, out in zip(("code", "prose"), stores):
        prepare_dataset(corpus[name], out, workers=1, progress=False)
    merge(stores, work / "mixture", weights=[0.6, 0.4])
    return work / "mixture"


def loader_run(mixture: Path, seq_len: int, n_windows: int) -> tuple[float, float, torch.Tensor]:
    """(seconds to build the loader's index, seconds to yield n windows, the last window)."""
    start = time.perf_counter()
    dataset = PackedSequenceDataset(mixture, seq_len)
    ready = time.perf_counter()
    iterator = iter(dataset)
    for _ in range(n_windows):
        window = next(iterator)
    return ready - start, time.perf_counter() - ready, window


def memmap_run(path: Path, seq_len: int, n_windows: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    tokens = np.memmap(path, dtype=np.uint32, mode="r")
    for i in range(n_windows):
        window = torch.from_numpy(tokens[i * seq_len: i * seq_len + seq_len + 1].astype(np.int64))
    return time.perf_counter() - start, window


def write_raw_stream(mixture: Path, seq_len: int, n_windows: int, path: Path) -> None:
    """The loader's packed stream for n windows, as a raw uint32 file (untimed)."""
    iterator = iter(PackedSequenceDataset(mixture, seq_len))
    windows = [next(iterator) for _ in range(n_windows)]
    stream = torch.cat([w[:-1] for w in windows] + [windows[-1][-1:]])
    stream.numpy().astype(np.uint32).tofile(path)


def s3_mixture(stack: contextlib.ExitStack, work: Path) -> str:
    """The benchmark's stores and mixture on a local moto S3 server; the mixture's URI."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from s3_server import client, moto_server, s3_env, upload_tree

    endpoint = stack.enter_context(moto_server())
    os.environ.update(s3_env(endpoint))
    s3 = client(endpoint)
    s3.create_bucket(Bucket="bench")
    for name in ("code", "prose"):
        upload_tree(s3, work / name, "bench", name)
    merge(["s3://bench/code", "s3://bench/prose"], "s3://bench/mixture", weights=[0.6, 0.4])
    return "s3://bench/mixture"


def s3_cold_start(mixture: str, seq_len: int, cache: Path) -> tuple[float, int]:
    """Seconds from nothing (an empty chunk cache) to the first window, and chunks fetched."""
    files = ChunkFiles(cache, max_bytes=1 << 34)
    start = time.perf_counter()
    next(iter(PackedSequenceDataset(mixture, seq_len, chunk_files=files)))
    return time.perf_counter() - start, files.downloads


def s3_warm_run(mixture: str, seq_len: int, n_windows: int, cache: Path) -> tuple[float, torch.Tensor]:
    """Seconds to yield n windows from a loader on a warm cache (its index build untimed)."""
    dataset = PackedSequenceDataset(mixture, seq_len, chunk_files=ChunkFiles(cache, max_bytes=1 << 34))
    start = time.perf_counter()
    iterator = iter(dataset)
    for _ in range(n_windows):
        window = next(iterator)
    return time.perf_counter() - start, window


def local_cold_start(mixture: Path, seq_len: int) -> float:
    start = time.perf_counter()
    next(iter(PackedSequenceDataset(mixture, seq_len)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_mb", type=float, default=8.0, help="MB of text per dataset")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no_s3", action="store_true", help="skip the object-storage case (c)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="blues-loader-bench-"))
    with contextlib.ExitStack() as stack:
        run(args, work, stack)


def run(args, work: Path, stack: contextlib.ExitStack) -> None:
    mixture = build_mixture(work, args.max_mb)
    remote = None if args.no_s3 else s3_mixture(stack, work)  # the server starts before the pinning
    pin_one_core()
    probe = PackedSequenceDataset(mixture, args.seq_len)
    n_windows = probe.num_windows(0)  # one pass: every chunk decompressed once
    raw = work / "stream.u32"
    write_raw_stream(mixture, args.seq_len, n_windows, raw)
    index_s, loader_s, memmap_s = [], [], []
    for _ in range(args.rounds):
        index, seconds, last_loader = loader_run(mixture, args.seq_len, n_windows)
        index_s.append(index)
        loader_s.append(seconds)
        seconds, last_memmap = memmap_run(raw, args.seq_len, n_windows)
        memmap_s.append(seconds)
        assert torch.equal(last_loader, last_memmap), "the two paths read different tokens"
    report(args, mixture, n_windows, index_s, loader_s, memmap_s)
    if remote is not None:
        report_s3(args, mixture, remote, n_windows, loader_s, last_memmap, work)


def report_s3(args, mixture: Path, remote: str, n_windows: int, loader_s, expected, work: Path) -> None:
    cold, local_cold, warm, loader_s = [], [], [], []  # interleaved: local and S3 in the same rounds
    for round_ in range(args.rounds):
        cache = work / f"cache-{round_}"
        seconds, fetched = s3_cold_start(remote, args.seq_len, cache)
        cold.append(seconds)
        local_cold.append(local_cold_start(mixture, args.seq_len))
        seconds, last = s3_warm_run(remote, args.seq_len, n_windows, cache)
        warm.append(seconds)
        assert torch.equal(last, expected), "S3 and local files gave different tokens"
        loader_s.append(loader_run(mixture, args.seq_len, n_windows)[1])
    tokens = n_windows * args.seq_len
    best, median = tokens / min(warm), tokens / statistics.median(warm)
    print(f"s3 warm  best {best / 1e6:8.1f} M tokens/s   median {median / 1e6:8.1f} M tokens/s   "
          f"(local loader in the same rounds: best {tokens / min(loader_s) / 1e6:.1f}; s3 / local: best {min(loader_s) / min(warm):.2f}, "
          f"median {statistics.median(loader_s) / statistics.median(warm):.2f})")
    print(f"cold start to the first window: s3 median {statistics.median(cold):.3f} s "
          f"({fetched} chunks fetched), local files median {statistics.median(local_cold):.3f} s")


def report(args, mixture: Path, n_windows: int, index_s, loader_s, memmap_s) -> None:
    tokens = n_windows * args.seq_len
    stored = sum(p.stat().st_size for d in ("code", "prose") for p in (mixture.parent / d).glob("*.arrow"))
    rate = {name: (tokens / min(s), tokens / statistics.median(s))
            for name, s in (("loader", loader_s), ("memmap", memmap_s))}
    print(f"{n_windows} windows of {args.seq_len + 1} ids = {tokens:,} tokens (one pass), "
          f"{args.rounds} rounds, 1 core")
    print(f"compressed chunks: {stored / 1e6:.1f} MB; raw uint32 stream: {tokens * 4 / 1e6:.1f} MB")
    for name, (best, median) in rate.items():
        print(f"{name:<8} best {best / 1e6:8.1f} M tokens/s   median {median / 1e6:8.1f} M tokens/s")
    print(f"loader / memmap: best {rate['loader'][0] / rate['memmap'][0]:.2f}, "
          f"median {rate['loader'][1] / rate['memmap'][1]:.2f}")
    print(f"loader index build (reads every chunk once): median {statistics.median(index_s):.3f} s")


if __name__ == "__main__":
    main()
