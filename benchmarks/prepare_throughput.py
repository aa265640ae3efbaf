"""Data preparation speed against bare tokenizer loops, on the same real text.

(a)  a bare loop of tiktoken `encode_ordinary` over the documents, already in memory, on one core;
(a') bare gigatoken `encode_batch` (parallel=False) over the same documents on one core, with
     a fresh tokenizer (the first pass over this text, as every prepare run makes) and again
     with the same one (its caches warm); (a'') the same with gigatoken's per-document
     `encode`, which is what the workers run;
(b)  `prepare_dataset(..., workers=1)`, what `blues prepare --workers 1` runs, end to end
     (read, decompress, parse, tokenize, spot-check, compress, hash, write; interpreter
     start-up and the engine's vocabulary load, once per process, aside), its caches reset
     first, as in a fresh `blues prepare`; (b warm) again without the reset: what a long
     run approaches once its caches hold the common words;
(c)  the same as (b) with `workers=2`.
Each is run `--rounds` times, interleaved; the best run (least disturbed by other
processes on a shared host) and the median are reported.

--alternatives: (b) and (c) with the other ways to run gigatoken swapped in: one worker
process instead of the calling thread, and gigatoken's own threads (`encode_batch` with
parallel=True on a tokenizing thread) instead of worker processes.
--profile: the CPU seconds of each stage of (b), each run alone on one core.
--rss_mb N: peak resident memory of `blues prepare`, in a fresh process, over N MB of random
words (every word new to gigatoken's cache): --workers 1 (encoding in that process) with the
memory limit and without it, and --workers 2 (worker processes) with it.

    .venv/bin/python benchmarks/prepare_throughput.py [--max_mb 20] [--rounds 3] [--profile]
        [--rss_mb 200] [--json benchmarks/results/prepare_throughput.json]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import pickle
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np

from blues_train.data import encoding_engine, encoding_workers, item_writer, prepare, spot_check, store, tokenizer
from blues_train.data.prepare import prepare_dataset
from blues_train.data.sample_corpus import write_sample_corpus
from blues_train.data.sources import SkipLog, ZstdFrames, discover_sources, iter_documents
from blues_train.io.atomic import write_atomic

NAMES = {
    "a": "(a) tiktoken encode_ordinary, 1 core",
    "a1": "(a') gigatoken encode_batch, 1st pass",
    "a1w": "(a') gigatoken encode_batch, warm",
    "a2": "(a'') gigatoken encode/doc, 1st pass",
    "b": "(b) prepare --workers 1",
    "bw": "(b warm) prepare --workers 1, again",
    "c": "(c) prepare --workers 2",
}
ALTERNATIVES = {
    "b_process": "(b) with one worker process",
    "c_threads": "(c) with gigatoken's threads",
}


@contextmanager
def one_core():
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {max(cores)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fresh_gigatoken():
    import gigatoken

    return gigatoken.Tokenizer.from_tiktoken(str(tokenizer.vocabulary_file()),
                                             pretokenizer=encoding_engine.GIGATOKEN_PRETOKENIZER, special_tokens={})


def bare_loops(texts: list[str]) -> dict:
    encoding = tokenizer.get_encoding()
    with one_core():
        times = {"a": timed(lambda: [encoding.encode_ordinary(text) for text in texts])}
        batched, single = fresh_gigatoken(), fresh_gigatoken()
        times["a1"] = timed(lambda: batched.encode_batch(texts, parallel=False))
        times["a1w"] = timed(lambda: batched.encode_batch(texts, parallel=False))
        times["a2"] = timed(lambda: [single.encode(text) for text in texts])
    return times


def prepare_run(inputs, out: Path, workers: int, reset: bool = True) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    if reset:
        encoding_engine.load_engine().reset()
    start = time.perf_counter()
    manifest = prepare_dataset(inputs, out, workers=workers, progress=False)
    return time.perf_counter() - start, manifest


def one_worker_process(jobs, engine, workers):
    return encoding_workers._encode_in_workers(jobs, engine, 1, math.inf, encoding_workers.EncoderMemory())


def gigatoken_threads(jobs, engine, workers):
    """encode_batch(parallel=True) on one tokenizing thread; gigatoken's pool uses every core."""
    def encode(texts):
        layout = engine.tokenizer.encode_batch(texts, parallel=True).layout
        tokens, offsets = np.asarray(layout.content.data), np.asarray(layout.offsets)
        return np.split(tokens, offsets[1:-1])

    with ThreadPoolExecutor(1) as thread:
        pending = deque()
        for tag, texts in jobs:
            pending.append((tag, thread.submit(encode, texts)))
            if len(pending) >= encoding_workers.BATCHES_IN_FLIGHT_PER_WORKER:
                tag, future = pending.popleft()
                yield tag, future.result()
        while pending:
            tag, future = pending.popleft()
            yield tag, future.result()


def alternative_runs(inputs, work: Path, rounds: int) -> dict:
    strategies = {"b_process": (one_worker_process, 1), "c_threads": (gigatoken_threads, 2)}
    times = {key: [] for key in strategies}
    chosen = item_writer.encode_batches
    try:
        for _ in range(rounds):
            for key, (strategy, workers) in strategies.items():
                item_writer.encode_batches = strategy
                times[key].append(prepare_run(inputs, work / key, workers)[0])
    finally:
        item_writer.encode_batches = chosen
    return {k: [round(t, 4) for t in v] for k, v in times.items()}


def throughput(inputs, texts, work: Path, rounds: int) -> dict:
    start = time.perf_counter()
    engine = encoding_engine.load_engine()
    load_s = time.perf_counter() - start
    fresh_gigatoken().encode_batch(["imports awkward, outside the timing"], parallel=False)
    times = {key: [] for key in NAMES}
    for _ in range(rounds):
        for key, seconds in bare_loops(texts).items():
            times[key].append(seconds)
        seconds, one = prepare_run(inputs, work / "w1", 1)
        times["b"].append(seconds)
        times["bw"].append(prepare_run(inputs, work / "w1", 1, reset=False)[0])
        seconds, two = prepare_run(inputs, work / "w2", 2)
        times["c"].append(seconds)
    tokens = one["totals"]["tokens"]
    assert tokens == sum(len(tokenizer.get_encoding().encode_ordinary(t)) for t in texts)
    assert one["fingerprint"] == two["fingerprint"] and one["tokenizer_engine"]["name"] == engine.name
    rates = {label: {k: round(tokens / pick(v) / 1e6, 2) for k, v in times.items()}
             for label, pick in (("best", min), ("median", statistics.median))}
    return {"engine": one["tokenizer_engine"], "engine_load_s": round(load_s, 3), "tokens": tokens,
            "stored_bytes_per_token": one["stats"]["stored_bytes_per_token"],
            "times_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
            "m_tokens_per_s": rates, "manifest": one}


def profile_stages(inputs, texts) -> dict:
    """CPU seconds of each stage of (b), each alone on one core (best of 3)."""
    def cpu(fn, n=3):
        best = float("inf")
        for _ in range(n):
            start = time.process_time()
            result = fn()
            best = min(best, time.process_time() - start)
        return best, result

    stages = {}
    with one_core():
        sources = discover_sources(inputs)
        for fmt in sorted({s.fmt for s in sources}):
            chosen = [s for s in sources if s.fmt == fmt]
            stages[f"read {fmt}"] = cpu(lambda: list(iter_documents(chosen, "text", SkipLog())))[0]
            if fmt == "jsonl.zst":
                stages["  of which zstd and line splitting"] = cpu(lambda: [zstd_lines(s) for s in chosen])[0]
        docs = list(iter_documents(sources, "text", SkipLog()))
        stages["repair, sizes, batches"], batches = cpu(lambda: list(item_writer._batches(docs)))
        sent = [pickle.dumps(b.texts, protocol=pickle.HIGHEST_PROTOCOL) for b in batches]
        stages["pickle texts to workers (--workers 2+)"] = (
            cpu(lambda: [pickle.dumps(b.texts, protocol=pickle.HIGHEST_PROTOCOL) for b in batches])[0]
            + cpu(lambda: [pickle.loads(p) for p in sent])[0])
        cold = []
        for _ in range(3):
            engine = encoding_engine.GigatokenEngine()
            seconds, ids = cpu(lambda: [engine.encode(t) for b in batches for t in b.texts], n=1)
            cold.append(seconds)
        stages["gigatoken encode, 1st pass"] = min(cold)
        stages["gigatoken encode, warm"] = cpu(lambda: [engine.encode(t) for b in batches for t in b.texts])[0]
        lengths = np.fromiter(map(len, ids), dtype=np.int64)
        tokens = np.concatenate(ids)
        back = pickle.dumps((tokens, lengths), protocol=pickle.HIGHEST_PROTOCOL)
        stages["pickle tokens back (--workers 2+)"] = (
            cpu(lambda: pickle.dumps((tokens, lengths), protocol=pickle.HIGHEST_PROTOCOL))[0]
            + cpu(lambda: pickle.loads(back))[0])
        chunks = chunk_slices(lengths, prepare.DEFAULT_CHUNK_TOKENS)
        texts = [t for b in batches for t in b.texts]
        labels, indices, where = [d.source for d in docs], [d.index for d in docs], [d.location for d in docs]
        reference = encoding_engine.TiktokenEngine()
        stages["spot check (tiktoken on the sample)"] = cpu(lambda: [
            spot_check.check_chunk(engine, reference, texts[a:b], where[a:b], labels[a:b], indices[a:b],
                                   tokens[lo:hi], lengths[a:b]) for a, b, lo, hi in chunks])[0]
        stages["Arrow + zstd-3 chunks"], data = cpu(lambda: [
            store.encode_chunk(tokens[lo:hi], lengths[a:b], labels[a:b], indices[a:b]) for a, b, lo, hi in chunks])
        stages["sha256"] = cpu(lambda: [hashlib.sha256(d).hexdigest() for d in data])[0]
        with tempfile.TemporaryDirectory() as folder:
            stages["write + fsync"] = cpu(lambda: [write_atomic(Path(folder) / f"c{i}", d)
                                                   for i, d in enumerate(data)])[0]
    return {stage: round(seconds, 4) for stage, seconds in stages.items()}


def zstd_lines(source) -> int:
    """The lines of a JSONL.zst source as the reader streams them, not parsed."""
    with open(source.path, "rb") as fh:
        return sum(1 for _ in io.BufferedReader(ZstdFrames(fh, source.label), buffer_size=ZstdFrames.READ_BYTES))


def chunk_slices(lengths: np.ndarray, chunk_tokens: int) -> list[tuple[int, int, int, int]]:
    """(first doc, end doc, first token, end token) of each chunk, cut as ChunkBuilder cuts."""
    ends = np.cumsum(lengths)
    slices, first, total = [], 0, 0
    for i, length in enumerate(lengths):
        total += int(length)
        if total >= chunk_tokens or i == len(lengths) - 1:
            slices.append((first, i + 1, int(ends[first] - lengths[first]), int(ends[i])))
            first, total = i + 1, 0
    return slices


RSS_SCRIPT = """
import json, math, resource, sys
from blues_train.data import encoding_engine, encoding_workers, item_writer, prepare
words, out, mode, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if mode == "uncapped":
    encoding_workers.MEMORY_LIMIT = math.inf
encoding_engine.load_engine()
before = encoding_workers.resident_bytes()[0]
memory = encoding_workers.EncoderMemory()
item_writer.encode_batches = lambda jobs, engine, n: encoding_workers.encode_batches(jobs, engine, n, memory=memory)
manifest = prepare.prepare_dataset([words], out, workers=workers, progress=False)
# VmHWM, not ru_maxrss, for this process: an exec'd process's ru_maxrss starts from its parent's size
print(json.dumps({"rss_before_run": before, "main_peak_rss": encoding_workers.resident_bytes()[1],
                  "worker_peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                  "measured_peak_growth": memory.peak_growth, "resets": memory.resets,
                  "tokens": manifest["totals"]["tokens"]}))
"""


def random_words_jsonl(path: Path, megabytes: int) -> None:
    """`megabytes` documents of 1 MB of random lower-case words of 4 to 11 letters."""
    rng = np.random.default_rng(0)
    with open(path, "w", encoding="ascii") as out:
        for _ in range(megabytes):
            lengths = rng.integers(4, 12, 1_000_000 // 8)
            letters = rng.integers(ord("a"), ord("z") + 1, int(lengths.sum() + len(lengths)), dtype=np.uint8)
            letters[np.cumsum(lengths + 1) - 1] = ord(" ")
            out.write(json.dumps({"text": letters.tobytes().decode("ascii")}) + "\n")


def memory_on_unique_words(work: Path, megabytes: int) -> dict:
    path = work / "words.jsonl"
    random_words_jsonl(path, megabytes)
    found = {"megabytes": megabytes, "memory_limit": encoding_workers.MEMORY_LIMIT}
    for mode, workers in (("capped", 1), ("uncapped", 1), ("capped", 2)):
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), str(work / mode), mode, str(workers)],
                                capture_output=True, text=True, check=True)
        found[f"{mode}, --workers {workers}"] = {**json.loads(result.stdout),
                                                 "seconds": round(time.perf_counter() - start, 1)}
        shutil.rmtree(work / mode)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_mb", type=float, default=20.0, help="MB of code (prose adds what exists)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--alternatives", action="store_true", help="(b), (c) run gigatoken other ways")
    parser.add_argument("--profile", action="store_true", help="CPU seconds of each stage of (b)")
    parser.add_argument("--rss_mb", type=int, default=0, help="MB of random words for the memory measurement")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="blues-bench-"))
    try:
        corpus = write_sample_corpus(work / "corpus", max_mb=args.max_mb)
        inputs = corpus["code"] + corpus["prose"]
        texts = [item_writer.decoded(d.text)[0] for d in iter_documents(discover_sources(inputs), "text", SkipLog())]
        megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        print(f"corpus: {len(texts)} documents, {megabytes:.1f} MB of text (stdlib code + prose)")
        figures = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
                   "corpus": {"documents": len(texts), "megabytes": round(megabytes, 2)}}
        figures["throughput"] = throughput(inputs, texts, work, args.rounds)
        report(figures["throughput"], megabytes)
        if args.alternatives:
            figures["alternatives_s"] = alternative_runs(inputs, work, args.rounds)
            report_alternatives(figures["alternatives_s"], figures["throughput"], megabytes)
        if args.profile:
            figures["profile_cpu_s"] = profile_stages(inputs, texts)
            print("CPU seconds per stage of (b), each alone on one core:")
            for stage, seconds in figures["profile_cpu_s"].items():
                print(f"  {stage:<40} {seconds:7.3f}")
        if args.rss_mb:
            figures["memory"] = memory_on_unique_words(work, args.rss_mb)
            report_memory(figures["memory"])
        figures["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        if args.json:
            figures["throughput"].pop("manifest")
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def machine() -> dict:
    return {"cores": os.cpu_count(), "python": platform.python_version(),
            "tiktoken": metadata.version("tiktoken"), "gigatoken": metadata.version("gigatoken"),
            "pyarrow": metadata.version("pyarrow"), "load_average_before": [round(x, 2) for x in os.getloadavg()]}


def report(found: dict, megabytes: float) -> None:
    tokens, times = found["tokens"], found["times_s"]
    best = {k: tokens / min(v) for k, v in times.items()}
    median = {k: tokens / statistics.median(v) for k, v in times.items()}
    print(f"engine {found['engine']['name']} {found['engine']['version']} (vocabulary load, once per process: "
          f"{found['engine_load_s']:.2f} s, not timed below)")
    for key, name in NAMES.items():
        print(f"{name:<40} best {best[key] / 1e6:6.2f} M tokens/s {megabytes / min(times[key]):6.1f} MB/s, "
              f"median {median[key] / 1e6:6.2f} M tokens/s (runs: {', '.join(f'{t:.3f}s' for t in times[key])})")
    for label, rate in (("best", best), ("median", median)):
        print(f"{label}: (a')/(a) 1st pass {rate['a1'] / rate['a']:.1f}, warm {rate['a1w'] / rate['a']:.1f}; "
              f"(b)/(a) = {rate['b'] / rate['a']:.2f}   (c)/(a) = {rate['c'] / rate['a']:.2f}   "
              f"(c)/(b) = {rate['c'] / rate['b']:.2f}")
    manifest = found["manifest"]
    print(f"tokens {tokens:,}; stored {manifest['stats']['stored_bytes_per_token']} bytes/token "
          f"({len(manifest['chunks'])} chunks); input {manifest['stats']['input_bytes_per_token']} bytes/token; "
          f"spot-checked {manifest['tokenizer_engine']['spot_check']['tokens'] / tokens:.2%} of the tokens")
    print(f"cores {os.cpu_count()}, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


def report_alternatives(times: dict, found: dict, megabytes: float) -> None:
    tokens, chosen = found["tokens"], found["times_s"]
    for key, name in ALTERNATIVES.items():
        ours = chosen[key[0]]
        print(f"{name:<40} best {tokens / min(times[key]) / 1e6:6.2f} M tokens/s {megabytes / min(times[key]):6.1f} "
              f"MB/s, median {tokens / statistics.median(times[key]) / 1e6:6.2f} M tokens/s; what prepare does: "
              f"best {tokens / min(ours) / 1e6:6.2f} (runs: {', '.join(f'{t:.3f}s' for t in times[key])})")


def report_memory(found: dict) -> None:
    print(f"memory over {found['megabytes']} MB of random words, limit {found['memory_limit'] / 2**20:.0f} MiB "
          "of growth per encoding process:")
    for mode, run in found.items():
        if isinstance(run, dict):
            print(f"  {mode:<22} peak RSS: main process {run['main_peak_rss'] / 2**20:6.0f} MiB (before the run "
                  f"{run['rss_before_run'] / 2**20:.0f}), workers {run['worker_peak_rss'] / 2**20:6.0f} MiB; growth "
                  f"{run['measured_peak_growth'] / 2**20:6.0f} MiB, {run['resets']} resets, {run['seconds']:.1f} s")


if __name__ == "__main__":
    main()
