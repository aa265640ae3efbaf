"""`blues dedup` on stores with planted duplicates, `blues merge --dedup`, the loader and verify."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from blues_train.data import store
from blues_train.io.errors import BluesError
from blues_train.mixture import dedup

WORDS = [f"{a}{b}{c}" for a in "bcdfghklmnprstvz" for b in "aeiou" for c in "lmnrstxk"]
LICENCE = ("Licensed under the Apache License, Version 2.0 (the License); you may not use this file except "
           "in compliance with the License. You may obtain a copy of the License at the address below. "
           "Unless required by applicable law or agreed to in writing, software distributed under the "
           "License is distributed on an AS IS BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND.")


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "."


def document(rng: random.Random, sentences: int = 50) -> list[str]:
    return [sentence(rng) for _ in range(sentences)]


def edited(doc: list[str], rng: random.Random, spans: int) -> list[str]:
    """A near copy: a new header (date) line and `spans` sentences rewritten."""
    out = [f"Retrieved on 2024-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}."] + list(doc)
    for at in rng.sample(range(1, len(out)), spans):
        out[at] = sentence(rng)
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Two stores, A and B (several chunks each), and which of their documents are copies.

    Keys are (store name, record index); `expected` maps each planted copy to its original.
    """
    from blues_train.data.prepare import prepare_dataset

    rng = random.Random(26)
    a = [document(rng) for _ in range(40)]
    b = [document(rng) for _ in range(40)]
    expected, below, boiler = {}, [], []
    # exact copies: across datasets and within one
    b.append(list(a[0])); expected[("B", len(b) - 1)] = ("A", 0)
    a.append(list(a[1])); expected[("A", len(a) - 1)] = ("A", 1)
    # near copies (a header and two sentences changed): across and within
    for original in range(2, 8):
        b.append(edited(a[original], rng, 2)); expected[("B", len(b) - 1)] = ("A", original)
    for original in range(8, 12):
        a.append(edited(a[original], rng, 2)); expected[("A", len(a) - 1)] = ("A", original)
    # pairs below the threshold (about half the sentences rewritten): both stay
    for original in range(12, 16):
        b.append(edited(a[original], rng, 22)); below.append((("B", len(b) - 1), ("A", original)))
    # unrelated documents sharing a long licence header: all stay
    for _ in range(6):
        a.append([LICENCE] + document(rng, 12)); boiler.append(("A", len(a) - 1))
    root = tmp_path_factory.mktemp("planted")
    stores = {}
    for name, docs in (("A", a), ("B", b)):
        raw = root / f"{name}.jsonl"
        raw.write_text("".join(json.dumps({"text": " ".join(doc)}) + "\n" for doc in docs))
        stores[name] = root / f"store_{name}"
        prepare_dataset([raw], stores[name], workers=1, chunk_tokens=12000, progress=False)
    return {"stores": stores, "expected": expected, "below": below, "boiler": boiler}


def documents(store_dir) -> dict[int, np.ndarray]:
    """{record index: token ids} of a one-file store."""
    out = {}
    for chunk in store.read_manifest(store_dir)["chunks"]:
        table = store.read_chunk(store.chunk_path(store_dir, chunk))
        for tokens, index in zip(table.column("tokens").to_pylist(), table.column("index").to_pylist()):
            out[index] = np.array(tokens)
    return out


def shingle_jaccard(x: np.ndarray, y: np.ndarray) -> float:
    sx = {tuple(x[i:i + 5]) for i in range(len(x) - 4)}
    sy = {tuple(y[i:i + 5]) for i in range(len(y) - 4)}
    return len(sx & sy) / len(sx | sy)


def removed_pairs(out) -> dict:
    record = dedup.read_result(out)
    table = dedup.read_removals(out, record).to_pylist()
    return {(r["dataset"][-1], r["index"]): (r["kept_dataset"][-1], r["kept_index"], r["reason"], r["jaccard"])
            for r in table}


@pytest.fixture(scope="module")
def result(planted):
    out = planted["stores"]["A"].parent / "dedup"
    dedup.dedup([planted["stores"]["A"], planted["stores"]["B"]], out, workers=2, say=lambda *_: None)
    return out


def test_planted_cases_are_what_they_claim(planted):
    docs = {name: documents(path) for name, path in planted["stores"].items()}
    for (name, index), (kept_name, kept_index) in planted["expected"].items():
        j = shingle_jaccard(docs[name][index], docs[kept_name][kept_index])
        assert j >= 0.85 or j == 1.0, (name, index, j)
    for (name, index), (other, other_index) in planted["below"]:
        assert shingle_jaccard(docs[name][index], docs[other][other_index]) <= 0.6
    licensed = [docs[name][index] for name, index in planted["boiler"]]
    assert max(shingle_jaccard(x, y) for i, x in enumerate(licensed) for y in licensed[i + 1:]) < 0.4


def test_every_planted_copy_and_nothing_else_is_removed(planted, result):
    removed = removed_pairs(result)
    assert set(removed) == set(planted["expected"])
    for copy, (kept_name, kept_index, reason, jaccard) in removed.items():
        original = planted["expected"][copy]
        assert (kept_name, kept_index) == original
        exact = copy in {("B", 40), ("A", 40)}
        assert reason == ("exact" if exact else "near") and (jaccard == 1.0) == exact
    record = dedup.read_result(result)
    by_name = {row["dataset"][-1]: row for row in record["counts"]}
    assert (by_name["A"]["exact"], by_name["A"]["near"], by_name["B"]["exact"], by_name["B"]["near"]) == (1, 4, 1, 6)


def test_result_is_the_same_for_one_worker_and_resumes_from_signatures(planted, result, tmp_path):
    stores = [planted["stores"]["A"], planted["stores"]["B"]]
    one = tmp_path / "one"
    dedup.dedup(stores, one, workers=1, say=lambda *_: None)
    first = dedup.read_result(one)
    assert first["fingerprint"] == dedup.read_result(result)["fingerprint"]
    signatures = sorted((one / "signatures").rglob("*.arrow"))
    assert len(signatures) > 2
    # a run killed after its signatures: only the result files are missing
    (one / "dedup.json").unlink()
    (one / first["removals"]["file"]).unlink()
    stamps = [p.stat().st_mtime_ns for p in signatures]
    said = []
    again = dedup.dedup(stores, one, workers=1, say=said.append)
    assert again["fingerprint"] == first["fingerprint"]
    assert [p.stat().st_mtime_ns for p in signatures] == stamps
    assert any(f"{len(signatures)} of {len(signatures)} chunk signature(s) already computed" in s for s in said)


def test_exact_only_keeps_near_copies(planted, tmp_path):
    out = tmp_path / "exact"
    dedup.dedup([planted["stores"]["A"], planted["stores"]["B"]], out, near=False, say=lambda *_: None)
    assert set(removed_pairs(out)) == {("B", 40), ("A", 40)}


def blues(*args):
    return subprocess.run([sys.executable, "-m", "blues_train.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_the_result_and_errors_are_one_line(planted, tmp_path):
    ok = blues("dedup", "--datasets", planted["stores"]["A"], planted["stores"]["B"], "--output", tmp_path / "d")
    assert ok.returncode == 0, ok.stderr
    assert "wrote" in ok.stdout and "removal(s)" in ok.stdout
    for args, words in [(["--threshold", "1.5"], "--threshold"),
                        (["--datasets", tmp_path / "nowhere"], "nowhere")]:
        given = ["--datasets", planted["stores"]["A"], "--output", tmp_path / "e", *args]
        bad = blues("dedup", *given)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and words in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_an_edited_result_is_refused(planted, result, tmp_path):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(result, copy)
    record = json.loads((copy / "dedup.json").read_text())
    record["parameters"]["threshold"] = 0.5
    (copy / "dedup.json").write_text(json.dumps(record))
    with pytest.raises(BluesError, match="edited after"):
        dedup.read_result(copy)


@pytest.fixture(scope="module")
def deduplicated_mixture(planted, result):
    from blues_train.mixture.merge import merge

    out = result.parent / "mixture"
    merge([planted["stores"]["A"], planted["stores"]["B"]], out, strategy="proportional", val_fraction=0.2,
          dedup=result)
    return out


def trained_documents(mixture_dir, split: str, index_cache_dir=None) -> set:
    """(store letter, record index) of every document in one pass of the split."""
    from blues_train.mixture.loader import PackedSequenceDataset

    data = PackedSequenceDataset(mixture_dir, seq_len=64, split=split, index_cache_dir=index_cache_dir)
    pieces = [p for w in range(data.num_windows(0)) for p in data.window_pieces(w)]
    return {(d.dataset[-1], d.index) for d in data.document_ids(pieces)}


def test_removed_documents_are_the_same_read_a_chunk_at_a_time(deduplicated_mixture, monkeypatch, tmp_path):
    """The split's documents are read a batch of chunks at a time; a batch of one chunk removes
    the same documents as a batch of a whole store."""
    from blues_train.mixture import loader

    whole = {split: trained_documents(deduplicated_mixture, split, tmp_path / "whole") for split in ("train", "val")}
    monkeypatch.setattr(loader, "BATCH_DOCUMENTS", 1)
    for split in ("train", "val"):
        assert trained_documents(deduplicated_mixture, split, tmp_path / "one") == whole[split]


def test_merge_records_the_result_and_shares_are_over_what_remains(planted, result, deduplicated_mixture):
    from blues_train.mixture.spec import read_mixture

    mixture = read_mixture(deduplicated_mixture)
    record = dedup.read_result(result)
    assert mixture["dedup"] == {"path": str(result), "fingerprint": record["fingerprint"]}
    for source, counts in zip(mixture["sources"], record["counts"]):
        total = store.read_manifest(source["path"])["totals"]
        assert source["docs"] == total["docs"] - counts["exact"] - counts["near"]
    remaining = [store.read_manifest(s["path"])["totals"]["tokens"] - c["removed_tokens"]
                 for s, c in zip(mixture["sources"], record["counts"])]
    assert mixture["sources"][0]["weight"] == pytest.approx(remaining[0] / sum(remaining))


def test_loader_never_yields_removed_documents(planted, deduplicated_mixture):
    removed = set(planted["expected"])
    seen = trained_documents(deduplicated_mixture, "train") | trained_documents(deduplicated_mixture, "val")
    assert not seen & removed
    everything = {(name, i) for name, path in planted["stores"].items() for i in documents(path)}
    assert seen == everything - removed


def test_verify_reports_a_result_changed_since_the_merge(planted, deduplicated_mixture, tmp_path):
    import shutil

    from blues_train.mixture.verify import verify_paths

    assert verify_paths([deduplicated_mixture]).ok
    moved = tmp_path / "m"
    shutil.copytree(deduplicated_mixture, moved)
    record = json.loads((moved / "mixture.json").read_text())
    folder = tmp_path / "dedup_again"
    dedup.dedup([planted["stores"]["A"], planted["stores"]["B"]], folder, near=False, say=lambda *_: None)
    record["dedup"]["path"] = str(folder)  # a different result where the merged one was
    (moved / "mixture.json").write_text(json.dumps(record))
    report = verify_paths([moved])
    assert any("dedup result changed after merging" in line for line in report.problem_lines())


def test_merge_refuses_a_result_without_the_dataset(planted, code_store, result, tmp_path):
    from blues_train.mixture.merge import merge

    with pytest.raises(BluesError, match="was not among its --datasets"):
        merge([planted["stores"]["A"], code_store], tmp_path / "m", dedup=result)


def test_lineage_says_which_document_a_removed_one_copies(planted, result, deduplicated_mixture):
    from blues_train.mixture.loader import PackedSequenceDataset
    from blues_train.serving import lineage

    stream = PackedSequenceDataset(deduplicated_mixture, 64)
    [a_file], [b_file] = ([s["path"] for s in store.read_manifest(planted["stores"][name])["sources"]]
                          for name in "AB")
    reports = {index: lineage.document_lineage(stream, [], {}, b_file, index) for index in (40, 41)}
    exact, near = reports[40]["removed"], reports[41]["removed"]  # copies of A:0 and A:2 (planted)
    assert (exact["reason"], exact["jaccard"]) == ("exact", 1.0)
    assert (exact["kept"]["source"], exact["kept"]["index"]) == (a_file, 0)
    assert (near["reason"], near["kept"]["index"]) == ("near", 2) and 0.8 <= near["jaccard"] < 1
    assert exact["dedup"] == near["dedup"] == str(result.resolve())
    shown = lineage.format_document(reports[41], "runs/r")
    assert f"removed by the dedup result {result.resolve()}: near duplicate of {a_file}:2 of " in shown
    assert f"(estimated Jaccard {near['jaccard']:.2f}); in no step of runs/r" in shown
    kept = lineage.document_lineage(stream, [], {}, a_file, 2)
    assert kept.get("removed") is None and "removed by" not in lineage.format_document(kept, "runs/r")
