"""Loader start-up, memory, pass-boundary stall, throughput and lineage against mixture size.

Synthetic stores (written directly with pyarrow through `store.encode_chunk`, plus the
document index `blues prepare` writes): random o200k ids, lognormal document lengths (mean
about 495 tokens; `--short`: about 60), 2M-token chunks, two stores merged 60/40 with a 1%
validation hold-out. For each size, in this one invocation and on the same stores:

- baseline: today's loader before the document index, frozen in tests/reference_loader.py;
- indexed: blues_train.mixture.loader, cold (an empty --index_cache_dir) and warm (the cache present).

Every measurement runs in a fresh process (so RSS is that process's own), rank 0 of 8,
seq_len 2048: start-up = construct + first window, for each split; RSS added = VmRSS after
the first window minus before construction (and the peak, ru_maxrss, minus the same; and
the private part, RssAnon: mapped cache files are shared page cache);
pass stall = the longest wait between two windows over the end of pass 0, the consumer
taking STEP_S per window (a training step) from PASS_TAIL windows before the end;
windows/s of rank 0 at world sizes 1, 8 and 64 (warm, for RATE_S after its first window; at
world > 1 over its windows of the stream's first SHARED_CHUNKS chunks, once with no chunk token
files, rank 0 decompressing every chunk itself, and once `_shared`, the token files present as
when the machine's other ranks built them); lineage: what
`blues lineage --step` does (a loader on the run's mixture, the pieces and names of the 8
windows of one step) and `--document` (find a document, list its windows in pass 0).

    .venv/bin/python benchmarks/loader_scale.py [--sizes 0.25,1,4] [--short] [--quick]
        [--work DIR] [--json benchmarks/results/loader_scale.json]
    .venv/bin/python benchmarks/loader_scale.py --sizes 1 --rates 1,8,64   # windows/s only, in one process
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from blues_train.data import (  # noqa: E402
    doc_index,  # noqa: E402
    store,
    tokenizer,
)

SEQ_LEN = 2048
WORLD = 8
CHUNK_TOKENS = 1 << 21
STEP_S = 0.01
PASS_TAIL = 400
RATE_S = 3.0  # windows/s: taken for at least this long, and at least MIN_RATE_WINDOWS
MIN_RATE_WINDOWS = 64
SHARED_CHUNKS = 16
RATE_CHUNKS = 128  # --rates: windows of this many chunks of the stream
STEP_WINDOWS = 8


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS), or its private part (RssAnon), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def write_store(folder: Path, tokens: int, mean_length: float, seed: int) -> None:
    """A token store of about `tokens` tokens, with its document index, written directly."""
    if (folder / store.MANIFEST).is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, tokenizer.EOT_ID, size=1 << 24, dtype=np.uint32)
    label, sigma = f"synthetic-{seed}.jsonl", 1.0
    chunks, written, docs = [], 0, 0
    while written < tokens:
        lengths = rng.lognormal(np.log(mean_length) - sigma**2 / 2, sigma, size=int(2 * CHUNK_TOKENS / mean_length))
        lengths = np.maximum(lengths.astype(np.int64), 1)
        lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), CHUNK_TOKENS)) + 1]
        start = int(rng.integers(0, len(pool) - lengths.sum()))
        body = pool[start: start + int(lengths.sum())]
        indices = np.arange(docs, docs + len(lengths))
        data = store.encode_chunk(body, lengths, [label] * len(lengths), indices)
        name = store.chunk_name(len(chunks))
        index = doc_index.encode_index(lengths, np.zeros(len(lengths)), indices)
        (folder / doc_index.index_name(name)).write_bytes(index)
        (folder / name).write_bytes(data)
        chunks.append({"file": name, "sha256": hashlib.sha256(data).hexdigest(),
                       "n_docs": len(lengths), "n_tokens": len(body), "bytes": len(data),
                       "index": doc_index.index_entry(doc_index.index_name(name), index)})
        written, docs = written + len(body), docs + len(lengths)
    info = tokenizer.tokenizer_info()
    manifest = {"format_version": store.FORMAT_VERSION, "kind": store.KIND, "tokenizer": info,
                "sources": [{"path": label, "bytes": 0, "sha256": f"{seed:064x}", "format": "jsonl"}],
                "chunks": chunks, "totals": {"docs": docs, "tokens": written, "input_bytes": 0,
                                             "stored_bytes": sum(c["bytes"] for c in chunks)},
                "skipped": {}, "settings": {"synthetic": True},
                "fingerprint": store.fingerprint(info["vocab_sha256"], [c["sha256"] for c in chunks])}
    store.write_manifest(folder, manifest)


def build_mixture(work: Path, billions: float, mean_length: float) -> Path:
    from blues_train.mixture.merge import merge

    tag = f"{billions:g}B" + ("-short" if mean_length < 100 else "")
    stores = [work / tag / name for name in ("a", "b")]
    for i, (folder, share) in enumerate(zip(stores, (0.6, 0.4))):
        write_store(folder, int(billions * 1e9 * share), mean_length, seed=i + 1)
    mixture = work / tag / "mixture"
    if not (mixture / "mixture.json").is_file():
        merge(stores, mixture, weights=[0.6, 0.4], val_fraction=0.01)
    return mixture


def loader(impl: str, mixture, split="train", rank=0, world=WORLD, cache=None):
    if impl == "baseline":
        import reference_loader

        return reference_loader.PackedSequenceDataset(mixture, SEQ_LEN, rank=rank, world_size=world, split=split)
    from blues_train.mixture.loader import PackedSequenceDataset

    return PackedSequenceDataset(mixture, SEQ_LEN, rank=rank, world_size=world, split=split, index_cache_dir=cache)


def measure(task: str, impl: str, mixture: str, cache: str | None, arg: str) -> dict:
    """One measurement, in this (fresh) process. Imports, pyarrow's lazy ones included, are
    done before: they are not timed (reading one chunk does them)."""
    import reference_loader  # noqa: F401

    from blues_train.mixture.loader import chunk_tokens

    first_store = json.loads((Path(mixture) / "mixture.json").read_text())["sources"][0]["path"]
    chunk_tokens(store.read_chunk(Path(first_store) / store.chunk_name(0)))
    before, private_before = rss_mb(), rss_mb("RssAnon")
    t0 = time.perf_counter()
    if task == "start":
        dataset = loader(impl, mixture, split=arg, cache=cache)
        next(iter(dataset))
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"seconds": seconds, "rss_added_mb": rss_mb() - before, "peak_added_mb": peak - before,
                "private_added_mb": rss_mb("RssAnon") - private_before}
    if task == "rate":  # arg: world size, or "world:windows" for exactly that many windows
        world, _, windows = arg.partition(":")
        dataset = loader(impl, mixture, world=int(world), cache=cache)
        it, taken = iter(dataset), 0
        next(it)
        t0 = time.perf_counter()
        while (taken < int(windows) if windows else taken < MIN_RATE_WINDOWS or time.perf_counter() - t0 < RATE_S):
            next(it)
            taken += 1
        return {"windows_per_s": taken / (time.perf_counter() - t0)}
    if task == "stall":
        dataset = loader(impl, mixture, cache=cache)
        n0 = dataset.num_windows(0)
        state = dataset.state_dict()
        state.update(epoch=0, window=n0 - WORLD * PASS_TAIL, windows=n0 - WORLD * PASS_TAIL)
        dataset.load_state_dict(state)
        it, gaps, last = iter(dataset), [], time.perf_counter()
        for _ in range(PASS_TAIL + 5):
            next(it)
            now = time.perf_counter()
            gaps.append(now - last)
            time.sleep(STEP_S)
            last = time.perf_counter()
        return {"max_gap_s": max(gaps[1:]), "boundary_gap_s": gaps[PASS_TAIL]}
    if task == "lineage":
        dataset = loader(impl, mixture, world=1, cache=cache)
        first = dataset.num_windows(0) // 2
        pieces = [p for w in range(first, first + STEP_WINDOWS) for p in dataset.window_pieces(w)]
        dataset.document_ids(pieces)
        step = time.perf_counter() - t0
        name = dataset.document_ids([pieces[0]])[0]
        t1 = time.perf_counter()
        document = dataset.find_document(name.source, name.index)
        dataset.document_windows(document, dataset.num_windows(0))
        return {"step_s": step, "document_s": time.perf_counter() - t1}
    raise ValueError(task)


def run(task: str, impl: str, mixture: Path, cache: Path | None, arg: str = "") -> dict:
    cmd = [sys.executable, __file__, "--measure", task, impl, str(mixture), str(cache or ""), arg]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {task:8} {impl:9} {arg:6} {json.dumps({k: round(v, 3) for k, v in result.items()})}", flush=True)
    return result


def bench_size(work: Path, billions: float, mean_length: float, quick: bool) -> dict:
    t0 = time.perf_counter()
    mixture = build_mixture(work, billions, mean_length)
    docs = sum(store.read_manifest(s["path"])["totals"]["docs"]
               for s in json.loads((mixture / "mixture.json").read_text())["sources"])
    print(f"{billions:g}B tokens, {docs:,} documents (stores ready in {time.perf_counter() - t0:.0f} s)", flush=True)
    cache = work / "plans" / f"{billions:g}-{mean_length:g}"
    result = {"tokens_billions": billions, "documents": docs, "mean_doc_tokens": mean_length}
    for split in ("train", "val"):
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        result[f"baseline_start_{split}"] = run("start", "baseline", mixture, None, split)
        result[f"cold_start_{split}"] = run("start", "indexed", mixture, cache, split)
        result[f"warm_start_{split}"] = run("start", "indexed", mixture, cache, split)
    result["baseline_stall"] = run("stall", "baseline", mixture, None)
    result["stall"] = run("stall", "indexed", mixture, cache)
    for world in ("1", "8") if quick else ("1", "8", "64"):
        result[f"baseline_rate_w{world}"] = run("rate", "baseline", mixture, None, world)
        for old in cache.rglob("tokens-*.npy"):  # rank 0 alone on its machine: it decompresses every chunk
            old.unlink()
        if world == "1":
            result["rate_w1"] = run("rate", "indexed", mixture, cache, world)
            continue
        # rank 0's windows of the first SHARED_CHUNKS chunks of the stream: decompressing each
        # chunk itself (alone on its machine), then again with the token files there (as when
        # the machine's other ranks built them; fewer than loader.TOKEN_FILES_KEPT)
        windows = f"{world}:{SHARED_CHUNKS * CHUNK_TOKENS // (SEQ_LEN * int(world))}"
        result[f"rate_w{world}"] = run("rate", "indexed", mixture, cache, windows)
        result[f"rate_w{world}_shared"] = run("rate", "indexed", mixture, cache, windows)
    result["baseline_lineage"] = run("lineage", "baseline", mixture, None)
    result["lineage"] = run("lineage", "indexed", mixture, cache)
    return result


def rate_medians(work: Path, billions: float, mean_length: float, worlds: list[int], reps: int = 6) -> dict:
    """Windows/s of rank 0 at each world size, in this one process: the median of `reps` loaders,
    each taking rank 0's windows of the stream's first RATE_CHUNKS chunks with the token files
    present (a first, untimed loader builds them; all of them are kept, as when the machine's
    other ranks read the same chunks at the same time). Steadier than the fresh-process rates:
    at world 64 about 2000 windows, not 256."""
    import statistics

    from blues_train.mixture import loader

    loader.TOKEN_FILES_KEPT = max(loader.TOKEN_FILES_KEPT, 2 * RATE_CHUNKS)
    mixture = build_mixture(work, billions, mean_length)
    cache = work / "plans" / f"{billions:g}-{mean_length:g}"
    result = {"tokens_billions": billions, "chunks_of_stream": RATE_CHUNKS}
    for world in worlds:
        n = RATE_CHUNKS * CHUNK_TOKENS // (SEQ_LEN * world)
        rates = []
        for rep in range(reps + 1):
            it = iter(loader.PackedSequenceDataset(mixture, SEQ_LEN, rank=0, world_size=world, index_cache_dir=cache))
            next(it)
            t0 = time.perf_counter()
            for _ in range(n):
                next(it)
            if rep:
                rates.append(n / (time.perf_counter() - t0))
        result[f"w{world}"] = {"median": statistics.median(rates), "runs": rates}
        print(f"  world {world:3}: median {statistics.median(rates):,.0f} windows/s of {n} "
              f"({', '.join(f'{r:,.0f}' for r in rates)})", flush=True)
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        task, impl, mixture, cache, arg = sys.argv[2:7]
        print(json.dumps(measure(task, impl, mixture, cache or None, arg)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.25,1,4", help="mixture sizes in billions of tokens")
    parser.add_argument("--short", action="store_true", help="short documents (mean about 60 tokens)")
    parser.add_argument("--quick", action="store_true", help="fewer measurements (no world size 64)")
    parser.add_argument("--work", default="/tmp/blues-loader-scale", help="where the synthetic stores go")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--rates", help="only windows/s of rank 0 at these world sizes (e.g. 1,8,64), "
                        "medians of several loaders in one process")
    args = parser.parse_args()
    mean_length = 60.0 if args.short else 495.0
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
               "load_average_before": os.getloadavg()[0], "seq_len": SEQ_LEN, "rank": 0, "world_size": WORLD,
               "cpus": os.cpu_count()}
    if args.rates:
        worlds = [int(w) for w in args.rates.split(",")]
        results["rates"] = [rate_medians(Path(args.work), float(s), mean_length, worlds) for s in args.sizes.split(",")]
    else:
        results["sizes"] = [bench_size(Path(args.work), float(s), mean_length, args.quick) for s in args.sizes.split(",")]
    if args.json:
        existing = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
        existing[("short" if args.short else "default") + ("_rates" if args.rates else "")] = results
        Path(args.json).write_text(json.dumps(existing, indent=1) + "\n")


if __name__ == "__main__":
    main()
