"""The indexed loader against today's loader, frozen in tests/reference_loader.py: the same
windows byte for byte, the same lineage answers, on the sample-corpus mixture."""

from __future__ import annotations

import numpy as np
import pytest
import reference_loader
from reference import take

from blues_train.mixture.loader import PackedSequenceDataset


def windows(dataset, n: int) -> np.ndarray:
    return np.stack([w.numpy() for w in take(dataset, n)])


@pytest.mark.parametrize("seed, seq_len, world_size, split", [
    (0, 512, 1, "train"), (5, 32, 3, "train"), (2, 100, 2, "val"), (0, 64, 1, "val")])
def test_windows_are_todays_across_a_pass_boundary(mixture_dir, tmp_path, seed, seq_len, world_size, split):
    options = dict(seed=seed, world_size=world_size, split=split)
    old = [reference_loader.PackedSequenceDataset(mixture_dir, seq_len, rank=r, **options) for r in range(world_size)]
    new = [PackedSequenceDataset(mixture_dir, seq_len, rank=r, index_cache_dir=tmp_path, **options)
           for r in range(world_size)]
    per_pass = old[0].num_windows(0)
    assert [new[0].num_windows(e) for e in range(3)] == [old[0].num_windows(e) for e in range(3)]
    n = -(-(per_pass + 5) // world_size)  # past the end of pass 0
    for a, b in zip(old, new):
        assert np.array_equal(windows(a, n), windows(b, n))


def test_resumed_windows_are_todays(mixture_dir, tmp_path):
    old = reference_loader.PackedSequenceDataset(mixture_dir, 64)
    take(old, old.num_windows(0) - 3)
    state = old.state_dict()
    for world_size in (1, 2):
        resumed_old = reference_loader.PackedSequenceDataset(mixture_dir, 64, rank=1 % world_size, world_size=world_size)
        resumed_new = PackedSequenceDataset(mixture_dir, 64, rank=1 % world_size, world_size=world_size,
                                            index_cache_dir=tmp_path)
        resumed_old.load_state_dict(state)
        resumed_new.load_state_dict(state)
        assert np.array_equal(windows(resumed_old, 8), windows(resumed_new, 8))
        assert resumed_new.state_dict(consumed=8) == resumed_old.state_dict(consumed=8)


def test_lineage_answers_are_todays(mixture_dir, tmp_path):
    old = reference_loader.PackedSequenceDataset(mixture_dir, 128)
    new = PackedSequenceDataset(mixture_dir, 128, index_cache_dir=tmp_path)
    n = old.num_windows(0)
    for g in (0, 7, n - 1, n, n + 1):
        pieces = new.window_pieces(g)
        assert [vars(p) for p in pieces] == [vars(p) for p in old.window_pieces(g)]
        assert [d.to_dict() for d in new.document_ids(pieces)] == [
            d.to_dict() for d in old.document_ids(old.window_pieces(g))]
        assert np.array_equal(new.window_tokens(g), old.window_tokens(g))
    document = old.window_pieces(n)[0].document
    assert [vars(h) for h in new.document_windows(document, n + 40)] == [
        vars(h) for h in old.document_windows(document, n + 40)]
    assert new.document_length(document) == old.document_length(document)
    name = old.document_ids([document])[0]
    assert new.find_document(name.source, name.index) == old.find_document(name.source, name.index)


def test_source_pieces_are_todays_at_any_cut():
    """The pieces of any token range of a source stream (inside an epoch, across epoch
    boundaries, several epochs, one-token documents) are today's, from the naive masks."""
    from blues_train.mixture import loader

    rng = np.random.default_rng(7)
    length = np.concatenate([[1, 1, 3], rng.integers(1, 40, 300)]).astype(np.int64)
    chunk = np.repeat(np.arange(11), 30)[: len(length)].astype(np.int32)  # 30 documents a chunk
    start = np.zeros(len(length), dtype=np.int64)
    old = reference_loader.Source(chunk, start, length, chunk, per_pass=0)
    new = loader.Source(chunk, start, length, chunk, per_pass=0, tokens=int(length.sum()), first=0)
    total = int(length.sum())
    cuts = [(0, 1), (0, total), (1, 2), (5, total + 5), (total - 1, total + 1), (3, 3 * total + 11)]
    cuts += [tuple(sorted(rng.integers(0, 4 * total, 2) + [0, 1])) for _ in range(40)]
    for first, end in cuts:
        for a, b in zip(reference_loader.source_pieces(old, [1, 2], first, end),
                        loader.source_pieces(new, [1, 2], first, end)):
            assert np.array_equal(a, b), (first, end)


@pytest.mark.parametrize("chunks", [1, 2, "all"])
def test_documents_are_todays_read_in_any_batches(mixture_dir, tmp_path, monkeypatch, chunks):
    """The split's document table, read a batch of chunks at a time (one chunk, two, all of a
    store), holds today's documents of each source."""
    from blues_train.data import store
    from blues_train.mixture import loader
    from blues_train.mixture.spec import read_mixture

    first_store = store.read_manifest(read_mixture(mixture_dir)["sources"][0]["path"])
    batch = {1: 1, 2: first_store["chunks"][0]["n_docs"] + 1, "all": 1 << 40}[chunks]
    monkeypatch.setattr(loader, "BATCH_DOCUMENTS", batch)
    for split in ("train", "val"):
        old = reference_loader.PackedSequenceDataset(mixture_dir, 64, split=split)
        new = PackedSequenceDataset(mixture_dir, 64, split=split, index_cache_dir=tmp_path)
        assert len(first_store["chunks"]) > 2
        for a, b in zip(old.sources, new.sources):
            for column in ("chunk", "start", "length", "row"):
                assert np.array_equal(getattr(a, column), getattr(b, column)), (split, column)
