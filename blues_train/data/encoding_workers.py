"""Where encoding runs: results in input order, few batches in flight, memory bounded.

One worker encodes on the calling thread: with gigatoken, tokenizing costs about what
reading and writing do, and a process would add its fork and the copies of texts and ids
(docs/benchmarks.md). More workers are processes forked from this one, a few batches in
flight each; this process reads, collects and writes.

gigatoken's encode cache grows with every distinct word it meets, and nothing in gigatoken
bounds it. So memory is watched where the encoding happens: once this process (one worker)
or a worker process has grown by more than `memory_limit` since its caches were fresh, the
engine is reset (one worker) or fresh workers take over after the batches in flight have
come back. Before each fresh start the free heap memory is handed back to the system
(where glibc keeps freed memory, as under the Makefile's tunables, a cache could otherwise
fill already-resident pages unseen), so resident memory counts what the cache takes. Which
worker encodes what never changes a result, only how fast it comes.
"""

from __future__ import annotations

import ctypes
import multiprocessing
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from blues_train.io import executor

BATCHES_IN_FLIGHT_PER_WORKER = 3
MEMORY_LIMIT = 256 << 20  # bytes an encoding process may grow by before its caches are dropped

_engine = None  # in a worker process: the engine it encodes with
_start_rss = 0


@dataclass
class EncoderMemory:
    """What the encoding processes reported: the most one grew since its caches were fresh
    (a worker: the kernel's high-water mark; this process: after each batch), and how many
    times caches were dropped."""

    peak_growth: int = 0
    resets: int = 0


def default_workers(engine) -> int:
    """Every core for tiktoken; all but one for a faster engine, whose encoding would
    otherwise wait on this process's reading and writing."""
    cores = executor.cores()
    return cores if engine.is_reference else max(1, cores - 1)


def encode_batches(jobs, engine, workers: int, memory_limit: float | None = None,
                   memory: EncoderMemory | None = None):
    """(tag, ids) for each (tag, texts) of `jobs`, in order, `ids` holding a uint32 array per
    text; `memory_limit` defaults to MEMORY_LIMIT (math.inf: none); `memory` collects what
    was measured."""
    memory_limit = MEMORY_LIMIT if memory_limit is None else memory_limit
    memory = memory if memory is not None else EncoderMemory()
    if workers == 1:
        return _encode_here(jobs, engine, memory_limit, memory)
    return _encode_in_workers(jobs, engine, workers, memory_limit, memory)


def _encode_here(jobs, engine, memory_limit, memory: EncoderMemory):
    """The engine's caches outlive a run: it carries `grown`, what earlier runs left."""
    start = _fresh_start() - engine.grown
    try:
        for tag, texts in jobs:
            yield tag, [engine.encode(text) for text in texts]
            growth = resident_bytes()[0] - start
            memory.peak_growth = max(memory.peak_growth, growth)
            if growth > memory_limit:
                engine.reset()
                start = _fresh_start()
                memory.resets += 1
    finally:
        engine.grown = max(_fresh_start() - start, 0)


def _encode_in_workers(jobs, engine, workers: int, memory_limit, memory: EncoderMemory):
    jobs = iter(jobs)
    while True:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_start_worker, initargs=(engine,))
        try:
            renew = yield from _run_pool(pool, jobs, workers, memory_limit, memory)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if not renew:
            return
        memory.resets += 1


def _run_pool(pool, jobs, workers: int, memory_limit, memory: EncoderMemory):
    """Feed `jobs` to `pool` until they end (False) or a worker outgrew the limit (True)."""
    pending, renew = deque(), False
    for tag, texts in jobs:
        pending.append((tag, pool.submit(_encode, texts)))
        if len(pending) >= workers * BATCHES_IN_FLIGHT_PER_WORKER:
            result, growth = _collect(pending.popleft(), memory)
            yield result
            if growth > memory_limit:
                renew = True
                break
    while pending:
        yield _collect(pending.popleft(), memory)[0]
    return renew


def _collect(entry, memory: EncoderMemory):
    tag, future = entry
    tokens, lengths, growth, peak = future.result()
    memory.peak_growth = max(memory.peak_growth, peak)
    return (tag, np.split(tokens, np.cumsum(lengths)[:-1])), growth


def _start_worker(engine) -> None:
    global _engine, _start_rss
    executor.die_with_parent()
    _engine, _start_rss = engine, _fresh_start()
    _restart_high_water_mark()


def _encode(texts: list[str]):
    """In a worker: the ids of `texts` as one buffer and lengths (one message back)."""
    ids = [_engine.encode(text) for text in texts]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.concatenate(ids) if ids else np.zeros(0, np.uint32)
    rss, peak = resident_bytes()
    return tokens, lengths, rss - _start_rss, peak - _start_rss


def _fresh_start() -> int:
    """Resident bytes once glibc's malloc_trim has handed the free heap pages back."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return resident_bytes()[0]


def _restart_high_water_mark() -> None:
    """The kernel's VmHWM restarts from the current resident memory (Linux clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def resident_bytes() -> tuple[int, int]:
    """This process's resident memory now and at its peak (Linux; zeros elsewhere)."""
    values = {}
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":")
                    values[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return values.get("VmRSS", 0), values.get("VmHWM", 0)
