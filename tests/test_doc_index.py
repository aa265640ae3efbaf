"""The document index of a store and the loader's plan cache: written once, memory-mapped,
derived for stores prepared before it, rebuilt when damaged, built once by ranks that
start together."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time

import numpy as np
import pytest
from reference import take

from blues_train.data import doc_index, store
from blues_train.io.errors import BluesError
from blues_train.mixture.loader import PackedSequenceDataset
from blues_train.mixture.merge import merge
from blues_train.mixture.plan_cache import PlanCache


def windows(dataset, n: int) -> np.ndarray:
    return np.stack([w.numpy() for w in take(dataset, n)])


def test_prepare_writes_the_index_the_chunks_describe(code_store):
    manifest = store.read_manifest(code_store)
    labels = [s["path"] for s in manifest["sources"]]
    for number, chunk in enumerate(manifest["chunks"]):
        records = doc_index.chunk_index(code_store, manifest, number)
        table = store.read_chunk(code_store / chunk["file"])
        assert records["length"].tolist() == store.doc_lengths(table).tolist()
        assert [labels[s] for s in records["source"]] == table.column("source").to_pylist()
        assert records["index"].tolist() == table.column("index").to_pylist()
        assert chunk["index"]["sha256"] == store.file_sha256(code_store / chunk["index"]["file"])


def test_store_without_index_derives_it_once(tmp_path, monkeypatch, code_store, prose_store, mixture_dir):
    """A store prepared before the index: the same windows, its index derived from the chunks
    into the cache root once, and read from there by the next loader."""
    monkeypatch.setenv("BLUES_CACHE_DIR", str(tmp_path / "cache"))
    old = tmp_path / "old-code"
    shutil.copytree(code_store, old)
    manifest = json.loads((old / store.MANIFEST).read_text())
    for chunk in manifest["chunks"]:
        (old / chunk.pop("index")["file"]).unlink()
    (old / store.MANIFEST).write_text(json.dumps(manifest))
    merge([old, prose_store], tmp_path / "mix", val_fraction=0.05)
    today = windows(PackedSequenceDataset(mixture_dir, 64, index_cache_dir=tmp_path / "a"), 50)
    assert np.array_equal(windows(PackedSequenceDataset(tmp_path / "mix", 64), 50), today)
    derived = sorted(doc_index.derived_folder().glob("*.npy"))
    assert len(derived) == len(manifest["chunks"])
    written = [path.stat().st_mtime_ns for path in derived]
    again = PackedSequenceDataset(tmp_path / "mix", 64, index_cache_dir=tmp_path / "b")
    assert np.array_equal(windows(again, 50), today)
    assert [path.stat().st_mtime_ns for path in derived] == written


def test_damaged_plan_cache_is_rebuilt(tmp_path, mixture_dir):
    first = PackedSequenceDataset(mixture_dir, 64, index_cache_dir=tmp_path)
    expected = windows(first, first.num_windows(0) + 3)
    folder = first.plan_cache.folder
    plan, documents = folder / "plan-train-seed0-pass0.npy", folder / "documents-train.npy"
    plan.write_bytes(plan.read_bytes()[:-64])
    documents.write_bytes(b"not an array")
    rebuilt = PackedSequenceDataset(mixture_dir, 64, index_cache_dir=tmp_path)
    assert np.array_equal(windows(rebuilt, len(expected)), expected)
    assert len(np.load(plan, mmap_mode="r")) == len(first.pass_plan(0).length)
    assert not list(folder.glob(".*.tmp"))


def test_open_hands_out_only_the_exact_array(tmp_path):
    """`PlanCache.open` (a rank reading a token file with pread) opens a file only when it is
    the whole array of the dtype and shape asked for; anything else goes through `get`."""
    cache = PlanCache(tmp_path)
    tokens = np.arange(1000, dtype=np.uint32)
    cache.get("t.npy", lambda allocate: tokens, lambda a: True)
    fd, offset = cache.open("t.npy", np.uint32, (1000,))
    try:
        out = np.empty(10, dtype=np.uint32)
        os.preadv(fd, [out], offset + 990 * 4)
        assert out.tolist() == tokens[990:].tolist()
    finally:
        os.close(fd)
    assert cache.open("t.npy", np.uint32, (999,)) is None and cache.open("t.npy", np.int64, (1000,)) is None
    assert cache.open("absent.npy", np.uint32, (1000,)) is None
    path = tmp_path / "t.npy"
    path.write_bytes(path.read_bytes()[:-4])  # cut short
    assert cache.open("t.npy", np.uint32, (1000,)) is None
    path.write_bytes(path.read_bytes()[:64] + b"X" + path.read_bytes()[65:] + b"\0\0\0\0")  # header damaged
    assert cache.open("t.npy", np.uint32, (1000,)) is None


def build_slowly(folder, log):
    def build(allocate):
        with open(log, "a") as fh:
            fh.write("built\n")
        time.sleep(0.5)
        return np.arange(1000)

    array = PlanCache(folder).get("table.npy", build, lambda a: len(a) == 1000)
    assert isinstance(array.base, np.memmap) and array[-1] == 999  # mapped, not read


def test_ranks_starting_together_build_once(tmp_path):
    context = multiprocessing.get_context("fork")
    ranks = [context.Process(target=build_slowly, args=(tmp_path / "plans", tmp_path / "log")) for _ in range(3)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(30)
    assert [rank.exitcode for rank in ranks] == [0, 0, 0]
    assert (tmp_path / "log").read_text() == "built\n"


def test_next_pass_is_planned_while_this_one_is_read(tmp_path, mixture_dir):
    dataset = PackedSequenceDataset(mixture_dir, 64, index_cache_dir=tmp_path)
    next_plan = dataset.plan_cache.folder / "plan-train-seed0-pass1.npy"
    assert not next_plan.exists()
    take(dataset, 1)
    assert not next_plan.exists()  # not while the first half of the pass is read
    resumed = PackedSequenceDataset(mixture_dir, 64, index_cache_dir=tmp_path)
    resumed.load_state_dict({**dataset.state_dict(), "window": dataset.num_windows(0) // 2})
    take(resumed, 1)
    deadline = time.monotonic() + 30
    while not next_plan.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert next_plan.exists()


def test_unwritable_cache_is_one_line(tmp_path, mixture_dir):
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(BluesError, match=f"while creating .* {blocked}"):
        PackedSequenceDataset(mixture_dir, 64, index_cache_dir=blocked / "cache")


def plan_passes(folder) -> list[int]:
    return sorted(int(p.stem.rsplit("pass", 1)[1]) for p in folder.glob("plan-train-seed0-pass*.npy"))


def test_only_the_recently_used_pass_plans_stay_on_disk(tmp_path, mixture_dir):
    """Passes 0-5 planned in turn keep the last three on disk; pass 0, asked for again, is
    rebuilt to the windows a cache that never pruned gives; a plan another process holds
    locked is not deleted. (The sleeps: file times are coarser than a tiny plan's build.)"""
    untouched = PackedSequenceDataset(mixture_dir, 512, index_cache_dir=tmp_path / "whole")
    expected = windows(untouched, untouched.num_windows(0) + 3)  # across the pass boundary
    dataset = PackedSequenceDataset(mixture_dir, 512, index_cache_dir=tmp_path / "pruned")
    folder = dataset.plan_cache.folder
    for epoch in range(6):
        time.sleep(0.02)
        dataset.pass_plan(epoch)
    assert plan_passes(folder) == [3, 4, 5]
    assert sorted(p.name for p in folder.glob(".plan-*.lock")) == [f".plan-train-seed0-pass{e}.npy.lock"
                                                                  for e in (3, 4, 5)]
    time.sleep(0.02)
    again = PackedSequenceDataset(mixture_dir, 512, index_cache_dir=tmp_path / "pruned")
    assert np.array_equal(windows(again, len(expected)), expected)
    assert plan_passes(folder) == [0, 1, 5]
    assert [p.stem for p in (tmp_path / "whole").glob("*/plan-*.npy")]  # the untouched cache kept its own

    from blues_train.mixture.plan_cache import FileLock

    with FileLock(folder / ".plan-train-seed0-pass5.npy.lock"):  # as if another rank were building it
        for epoch in (6, 7):
            time.sleep(0.02)
            again.pass_plan(epoch)
        assert plan_passes(folder) == [1, 5, 6, 7]  # 0 went; 5, the oldest, stays while locked
    time.sleep(0.02)
    again.pass_plan(8)
    assert plan_passes(folder) == [6, 7, 8]
