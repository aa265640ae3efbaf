"""The packed-sequence loader against a slow, obvious twin built from the Arrow chunks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import blob, pieces, store_docs, stream, take, tokens_by_source
from torch.utils.data import DataLoader

from blues_train.data.tokenizer import EOT_ID
from blues_train.io.errors import BluesError
from blues_train.mixture.loader import ChunkCache, PackedSequenceDataset
from blues_train.mixture.merge import merge

SEQ_LEN = 512
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, code_store, prose_store):
    out = tmp_path_factory.mktemp("mixture")
    merge([code_store, prose_store], out, weights=[0.6, 0.4], val_fraction=0.2, seed=3)
    return out


@pytest.fixture(scope="module")
def docs(code_store, prose_store):
    return [store_docs(code_store, 0.2), store_docs(prose_store, 0.2)]


def test_windows_are_documents_joined_by_eot(mixture, docs):
    dataset = PackedSequenceDataset(mixture, SEQ_LEN)
    windows = take(dataset, dataset.num_windows(0))
    assert all(w.dtype == torch.int64 and w.shape == (SEQ_LEN + 1,) for w in windows)
    counts = tokens_by_source(stream(windows), [blob(d["train"]) for d in docs])
    shares = counts / counts.sum()
    assert abs(shares[0] - 0.6) < 0.01 and abs(shares[1] - 0.4) < 0.01


def test_validation_documents_never_in_train_stream(mixture, docs):
    train = PackedSequenceDataset(mixture, SEQ_LEN)
    val_only = {d for source in docs for d in source["val"]} - {d for s in docs for d in s["train"]}
    assert val_only
    windows = take(train, train.num_windows(0) + train.num_windows(1))
    ids = stream(windows[:train.num_windows(0)]) + [EOT_ID] + stream(windows[train.num_windows(0):])
    seen = {tuple(np.frombuffer(p, dtype=np.uint32).tolist()) for p in pieces(ids)}
    assert not seen & val_only


def test_validation_stream_holds_each_held_out_document_once(mixture, docs):
    val = PackedSequenceDataset(mixture, SEQ_LEN, split="val")
    ids = stream(take(val, val.num_windows(0)))
    counts = tokens_by_source(ids, [blob(d["val"]) for d in docs])
    total = sum(len(doc) for source in docs for doc in source["val"])
    assert total - (SEQ_LEN + 1) - 2 * max(map(len, docs[0]["val"] + docs[1]["val"])) < counts.sum() <= total


def test_deterministic_for_seed(mixture):
    a = take(PackedSequenceDataset(mixture, SEQ_LEN, seed=1), 20)
    b = take(PackedSequenceDataset(mixture, SEQ_LEN, seed=1), 20)
    c = take(PackedSequenceDataset(mixture, SEQ_LEN, seed=2), 20)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_rank_shards_are_disjoint_and_complete(mixture):
    single = take(PackedSequenceDataset(mixture, SEQ_LEN), 60)
    shards = [take(PackedSequenceDataset(mixture, SEQ_LEN, rank=r, world_size=3), 20) for r in range(3)]
    for r, shard in enumerate(shards):
        assert all(torch.equal(w, single[3 * i + r]) for i, w in enumerate(shard))


@pytest.mark.parametrize("consumed", [5, 0])
def test_resume_is_exact_across_passes(mixture, consumed):
    dataset = PackedSequenceDataset(mixture, SEQ_LEN)
    per_pass = dataset.num_windows(0)
    reference = take(PackedSequenceDataset(mixture, SEQ_LEN), per_pass + consumed + 40)
    first = per_pass + consumed - 10  # resume 10 windows before the pass ends
    take(dataset, first)
    state = json.loads(json.dumps(dataset.state_dict()))
    resumed = PackedSequenceDataset(mixture, SEQ_LEN)
    resumed.load_state_dict(state)
    assert all(torch.equal(w, reference[first + i]) for i, w in enumerate(take(resumed, 50)))


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 1), (1, 3)])
def test_resume_on_another_world_size(mixture, saved_on, resumed_on):
    reference = take(PackedSequenceDataset(mixture, SEQ_LEN), 60)
    states = []
    for rank in range(saved_on):
        dataset = PackedSequenceDataset(mixture, SEQ_LEN, rank=rank, world_size=saved_on)
        take(dataset, 6)
        states.append(dataset.state_dict())
    assert all(state == states[0] for state in states)
    for rank in range(resumed_on):
        dataset = PackedSequenceDataset(mixture, SEQ_LEN, rank=rank, world_size=resumed_on)
        dataset.load_state_dict(states[0])
        for i, window in enumerate(take(dataset, 5)):
            assert torch.equal(window, reference[6 * saved_on + rank + i * resumed_on])


def test_dataloader_workers_deliver_the_single_process_order(mixture):
    single = torch.stack(take(PackedSequenceDataset(mixture, SEQ_LEN), 32))
    dataset = PackedSequenceDataset(mixture, SEQ_LEN, batch_size=4)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, multiprocessing_context="fork")
    batches = [batch for batch, _ in zip(loader, range(8))]
    assert torch.equal(torch.cat(batches), single)
    resumed = PackedSequenceDataset(mixture, SEQ_LEN)
    resumed.load_state_dict(dataset.state_dict(consumed=24))
    assert torch.equal(next(iter(resumed)), single[24])


def test_resume_refuses_another_seq_len(mixture):
    state = PackedSequenceDataset(mixture, SEQ_LEN).state_dict()
    with pytest.raises(BluesError, match="seq_len"):
        PackedSequenceDataset(mixture, 256).load_state_dict(state)


def test_chunk_cache_is_bounded(code_store):
    manifest = json.loads((code_store / "manifest.json").read_text())
    paths = [code_store / c["file"] for c in manifest["chunks"]]
    cache = ChunkCache(paths, [c["n_tokens"] for c in manifest["chunks"]], capacity=2)
    for chunk in [0, 1, 2, 3, 1, 0] if len(paths) >= 4 else range(len(paths)):
        assert len(cache.get(chunk)) == manifest["chunks"][chunk]["n_tokens"]
        assert len(cache.tokens) <= 2


def test_ranks_map_each_chunk_decompressed_once_per_machine(code_store, prose_store, tmp_path, monkeypatch):
    """Ranks of a multi-rank run read chunks from uncompressed token files in the index cache,
    built by the first rank that needs each: at most TOKEN_FILES_KEPT stay; once built, a rank
    reads its windows from them alone (here: with the chunk files gone); the windows are those
    of a single process, which decompresses in memory and writes none."""
    from blues_train.mixture import loader

    stores = [shutil.copytree(s, tmp_path / s.name) for s in (code_store, prose_store)]
    merge(stores, tmp_path / "mix", weights=[0.6, 0.4], val_fraction=0.2, seed=3)
    single = PackedSequenceDataset(tmp_path / "mix", SEQ_LEN, index_cache_dir=tmp_path / "single")
    n = 2 * single.num_windows(0)
    expected = take(single, n)
    assert not list((tmp_path / "single").rglob("tokens-*"))
    chunks = sorted(stores[0].glob("*.arrow")) + sorted(stores[1].glob("*.arrow"))

    monkeypatch.setattr(loader, "TOKEN_FILES_KEPT", 2)
    pruned = PackedSequenceDataset(tmp_path / "mix", SEQ_LEN, rank=1, world_size=2, index_cache_dir=tmp_path / "few")
    assert all(torch.equal(w, expected[2 * i + 1]) for i, w in enumerate(take(pruned, n // 2)))
    assert len(list((tmp_path / "few").rglob("tokens-*.npy"))) == 2
    monkeypatch.undo()

    cache = tmp_path / "index"
    rank0 = PackedSequenceDataset(tmp_path / "mix", SEQ_LEN, rank=0, world_size=2, index_cache_dir=cache)
    assert all(torch.equal(w, expected[2 * i]) for i, w in enumerate(take(rank0, n // 2)))
    assert len(list(cache.rglob("tokens-*.npy"))) == len(chunks) > 2
    for chunk in chunks:
        chunk.unlink()
    rank1 = PackedSequenceDataset(tmp_path / "mix", SEQ_LEN, rank=1, world_size=2, index_cache_dir=cache)
    assert all(torch.equal(w, expected[2 * i + 1]) for i, w in enumerate(take(rank1, n // 2)))


def test_a_token_file_cut_short_while_read_is_one_line(mixture, tmp_path):
    """A rank reads the token files it opened with pread: one cut short meanwhile is an error
    naming it, not windows of garbage."""
    dataset = PackedSequenceDataset(mixture, 64, rank=1, world_size=2, index_cache_dir=tmp_path)
    windows = iter(dataset)
    next(windows)
    files = list(tmp_path.rglob("tokens-*.npy"))
    assert files
    for path in files:
        with open(path, "r+b") as fh:
            fh.truncate(256)
    with pytest.raises(BluesError, match="tokens-.*npy: shorter than when it was checked"):
        for _ in range(dataset.num_windows(0)):
            next(windows)


def test_a_rank_exits_with_its_token_files_open_and_says_nothing(mixture, tmp_path):
    """A training process ends with its loader's iterator (and the token files it has open)
    still alive: closing them at interpreter exit must not print errors."""
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from blues_train.mixture import loader\n"
              f"it = iter(loader.PackedSequenceDataset({str(mixture)!r}, 64, rank=1, world_size=2, "
              f"index_cache_dir={str(tmp_path)!r}))\n"
              "for _ in range(200): next(it)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
    assert list(tmp_path.rglob("tokens-*.npy"))


def test_validation_restarts_repeat_over_many_passes(mixture):
    """What training's evaluate does: rewind to the same start, read past several passes."""
    val = PackedSequenceDataset(mixture, 64, split="val")
    start = val.state_dict()
    n = 3 * val.num_windows() + 1
    first = take(val, n)
    val.load_state_dict(start)
    again = take(val, n)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


class TiedKeys:
    """A random generator whose keys tie often (a tie is about n^2 / 2^54 likely from a real one)."""

    def __init__(self, n_chunks: int, n_docs: int):
        rng = np.random.default_rng(7)
        self.chunk_rank, self.keys = rng.permutation(n_chunks), rng.integers(0, 4, n_docs) / 4

    def permutation(self, n: int) -> np.ndarray:
        return self.chunk_rank

    def random(self, n: int) -> np.ndarray:
        return self.keys


def test_epoch_order_breaks_ties_by_position():
    """The per-chunk quicksorts fall back to stable sorts on tied keys: the order is exactly
    the naive one, all documents by (shuffled chunk, key, position)."""
    from blues_train.mixture.loader import Source, epoch_order

    chunk = np.repeat(np.arange(5, dtype=np.int32), [3, 40, 1, 17, 9])
    rng = TiedKeys(5, len(chunk))
    naive = np.lexsort((np.arange(len(chunk)), rng.keys, rng.chunk_rank[chunk]))
    source = Source(chunk, np.zeros(len(chunk), np.int64), np.ones(len(chunk), np.int64),
                    np.arange(len(chunk)), len(chunk), len(chunk), 0)
    assert epoch_order(source, rng).tolist() == naive.tolist()
