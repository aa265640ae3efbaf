"""The chunk tables kept in the plan cache: the same chunks as the manifests say, and never a
way around a check of a manifest or store folder changed since."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from blues_train.data import store
from blues_train.io.errors import BluesError
from blues_train.mixture import mixture_chunks
from blues_train.mixture.loader import PackedSequenceDataset
from blues_train.mixture.merge import merge
from blues_train.mixture.mixture_chunks import MixtureChunks
from blues_train.mixture.spec import read_mixture

SEQ_LEN = 256


@pytest.fixture
def mixture(tmp_path, code_store, prose_store):
    stores = [shutil.copytree(s, tmp_path / name) for s, name in ((code_store, "code"), (prose_store, "prose"))]
    merge(stores, tmp_path / "mix", weights=[0.5, 0.5], val_fraction=0.1, seed=1)
    return tmp_path / "mix"


def windows(dataset, n=12):
    it = iter(dataset)
    return [next(it) for _ in range(n)]


def tables(cache):
    return sorted(cache.rglob("chunks-*.npy"))


def same_chunks(a: MixtureChunks, b: MixtureChunks) -> bool:
    return (list(a.paths) == list(b.paths) and list(a.meta) == list(b.meta)
            and a.n_tokens.tolist() == b.n_tokens.tolist() and a.bounds.tolist() == b.bounds.tolist())


def test_kept_tables_give_the_manifests_chunks_without_reading_them(mixture, tmp_path, monkeypatch):
    monkeypatch.setattr(mixture_chunks, "RACY_NS", 0)
    cache = tmp_path / "plans"
    first = PackedSequenceDataset(mixture, SEQ_LEN, rank=1, world_size=2, index_cache_dir=cache)
    assert len(tables(cache)) == 2 and first.chunks._manifests  # one per store, read to build it
    again = PackedSequenceDataset(mixture, SEQ_LEN, rank=1, world_size=2, index_cache_dir=cache)
    assert not again.chunks._manifests  # start-up read no manifest whole
    manifests = MixtureChunks.of(read_mixture(mixture))  # no cache: every manifest read
    assert same_chunks(again.chunks, manifests) and same_chunks(first.chunks, manifests)
    assert [p.name for p in manifests.paths] == [c["file"] for s in ("code", "prose")
                                                for c in store.read_manifest(tmp_path / s)["chunks"]]
    assert all(torch.equal(a, b) for a, b in zip(windows(first), windows(again)))
    named = again.document_ids([(1, int(again.chunks.bounds[1]), 0)])[0]  # the manifest read when asked
    assert named.source == store.read_manifest(tmp_path / "prose")["sources"][named_source(again)]["path"]


def named_source(dataset) -> int:
    """The raw file (position in its store's sources) of the prose store's first document."""
    return int(dataset._chunk_index(int(dataset.chunks.bounds[1]))[0]["source"])


def test_a_manifest_changed_since_is_checked_again(mixture, tmp_path, monkeypatch):
    monkeypatch.setattr(mixture_chunks, "RACY_NS", 0)
    cache = tmp_path / "plans"
    PackedSequenceDataset(mixture, SEQ_LEN, index_cache_dir=cache)
    path = tmp_path / "code" / store.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["chunks"][0]["file"] = "../outside.arrow"  # the fingerprint (chunk hashes) is unchanged
    path.write_text(json.dumps(manifest))
    with pytest.raises(BluesError, match=r"chunks\[0\].file: not a file name"):
        PackedSequenceDataset(mixture, SEQ_LEN, index_cache_dir=cache)


def test_a_symbolic_link_put_in_a_store_since_is_refused(mixture, tmp_path, monkeypatch):
    monkeypatch.setattr(mixture_chunks, "RACY_NS", 0)
    cache = tmp_path / "plans"
    PackedSequenceDataset(mixture, SEQ_LEN, index_cache_dir=cache)
    name = store.read_manifest(tmp_path / "prose")["chunks"][0]["file"]
    outside = tmp_path / "outside.arrow"
    (tmp_path / "prose" / name).rename(outside)
    (tmp_path / "prose" / name).symlink_to(outside)
    with pytest.raises(BluesError, match=f"{name}.*symbolic link"):
        PackedSequenceDataset(mixture, SEQ_LEN, index_cache_dir=cache)


def test_a_damaged_table_is_built_again(mixture, tmp_path, monkeypatch):
    monkeypatch.setattr(mixture_chunks, "RACY_NS", 0)
    cache = tmp_path / "plans"
    reference = windows(PackedSequenceDataset(mixture, SEQ_LEN, index_cache_dir=cache))
    table = tables(cache)[0]
    table.write_bytes(table.read_bytes()[:-7])
    again = PackedSequenceDataset(mixture, SEQ_LEN, index_cache_dir=cache)
    assert all(torch.equal(a, b) for a, b in zip(reference, windows(again)))
    assert np.load(table, allow_pickle=False).shape == (len(store.read_manifest(tmp_path / "code")["chunks"]),)


def test_no_table_is_kept_for_a_store_folder_changed_just_now(mixture, tmp_path):
    cache = tmp_path / "plans"
    (tmp_path / "code" / "notes.txt").write_text("changed now")  # within RACY_NS
    PackedSequenceDataset(mixture, SEQ_LEN, index_cache_dir=cache)
    assert [p.name.split("-")[1] for p in tables(cache)] in ([], ["1"])  # not the code store's


def test_a_name_in_a_planted_table_never_leads_out(mixture, tmp_path, monkeypatch):
    """A table is read from a file: one whose key fits but whose names lead out is refused
    where a name becomes a path."""
    monkeypatch.setattr(mixture_chunks, "RACY_NS", 0)
    cache = tmp_path / "plans"
    PackedSequenceDataset(mixture, SEQ_LEN, index_cache_dir=cache)
    for table in tables(cache):
        planted = np.load(table, allow_pickle=False).astype([("file", "U40"), ("n_tokens", "<i8"), ("bytes", "<i8"),
                                                             ("sha256", "S64")])
        planted["file"] = "../../outside.arrow"
        np.save(table, planted, allow_pickle=False)
    with pytest.raises(BluesError, match="index cache is named '../../outside.arrow', not a file name"):
        windows(PackedSequenceDataset(mixture, SEQ_LEN, index_cache_dir=cache))
