"""Token stores: exact tokens, the manifest contract, determinism, resume, bad input."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import zstandard

from blues_train import cli
from blues_train.data import item_writer, store
from blues_train.data.prepare import prepare_dataset
from blues_train.io.errors import BluesError

CHUNK = 65536


def plain_texts(root, source: dict) -> list[str]:
    """A source's records read with plain stdlib/pyarrow calls (the independent reading)."""
    path, fmt = root / source["path"], source["format"]
    if fmt == "text":
        return [path.read_bytes().decode("utf-8", "replace")]
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8") as fh:
            return [row["text"] for row in csv.DictReader(fh)]
    if fmt == "parquet":
        return pq.read_table(path).column("text").to_pylist()
    raw = path.read_bytes()
    if fmt == "jsonl.zst":
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    return [json.loads(line)["text"] for line in raw.decode().splitlines()]


def assert_tokens_match_tiktoken(store_dir, root, encoding):
    manifest = store.read_manifest(store_dir)
    texts = {s["path"]: plain_texts(root, s) for s in manifest["sources"]}
    rows = 0
    for chunk in manifest["chunks"]:
        table = store.read_chunk(store.chunk_path(store_dir, chunk))
        for tokens, source, index in zip(*(table.column(c).to_pylist() for c in ("tokens", "source", "index"))):
            assert tokens == encoding.encode_ordinary(texts[source][index]), (source, index)
            rows += 1
    assert rows == manifest["totals"]["docs"] == sum(len(t) for t in texts.values())
    return manifest


def test_code_store_equals_tiktoken_jsonl_zst(code_store, sample_corpus_dir, reference_encoding):
    manifest = assert_tokens_match_tiktoken(code_store, sample_corpus_dir / "code", reference_encoding)
    assert {s["format"] for s in manifest["sources"]} == {"jsonl.zst"}


def test_prose_store_equals_tiktoken_parquet_csv_text(prose_store, sample_corpus_dir, reference_encoding):
    manifest = assert_tokens_match_tiktoken(prose_store, sample_corpus_dir / "prose", reference_encoding)
    assert {s["format"] for s in manifest["sources"]} == {"parquet", "csv", "text"}


def test_plain_jsonl_equals_tiktoken_including_special_strings(tmp_path, sample_corpus_dir, reference_encoding):
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(
        (sample_corpus_dir / "code" / "stdlib.jsonl.zst").read_bytes())
    lines = raw.decode().splitlines()[:20]
    lines.append(json.dumps({"text": "a <|endoftext|> b <|endofprompt|> c"}))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "code.jsonl").write_text("\n".join(lines) + "\n")
    prepare_dataset([tmp_path / "in" / "code.jsonl"], tmp_path / "store", chunk_tokens=CHUNK, progress=False)
    assert_tokens_match_tiktoken(tmp_path / "store", tmp_path / "in", reference_encoding)
    last = store.read_chunk(store.chunk_path(tmp_path / "store", store.read_manifest(tmp_path / "store")["chunks"][-1]))
    assert not {199999, 200018} & set(last.column("tokens")[-1].as_py())


def test_manifest_contract(code_store):
    manifest = store.read_manifest(code_store)
    assert manifest["format_version"] == 1 and manifest["kind"] == "token_store"
    assert manifest["tokenizer"]["name"] == "o200k_base"
    assert len(manifest["chunks"]) > 1
    for chunk in manifest["chunks"]:
        data = store.chunk_path(code_store, chunk).read_bytes()
        assert hashlib.sha256(data).hexdigest() == chunk["sha256"] and len(data) == chunk["bytes"]
        table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
        assert table.schema == store.SCHEMA and table.num_rows == chunk["n_docs"]
        assert pc.sum(pc.list_value_length(table["tokens"])).as_py() == chunk["n_tokens"]
    totals, stats = manifest["totals"], manifest["stats"]
    assert totals["tokens"] == sum(c["n_tokens"] for c in manifest["chunks"])
    assert totals["stored_bytes"] == sum(c["bytes"] for c in manifest["chunks"])
    # Raw uint32 would be 4; these small chunks compress less than full-size ones (benchmark: <= 1).
    assert stats["stored_bytes_per_token"] < 1.5
    assert 3 < stats["input_bytes_per_token"] < 5
    p = stats["doc_tokens_percentiles"]
    assert p["p0"] <= p["p10"] <= p["p50"] <= p["p90"] <= p["p99"] <= p["p100"]
    assert manifest["fingerprint"] == store.store_fingerprint(manifest)
    assert set(manifest["settings"]) == {"chunk_tokens", "text_field", "format", "glob", "item_bytes"}


def test_chunks_end_at_documents_once_chunk_tokens_is_reached(code_store):
    manifest = store.read_manifest(code_store)
    for chunk in manifest["chunks"][:-1]:
        lengths = store.doc_lengths(store.read_chunk(store.chunk_path(code_store, chunk)))
        assert lengths.sum() >= CHUNK > lengths[:-1].sum()


def test_same_result_for_one_and_two_workers(tmp_path, sample_corpus_inputs, prose_store):
    """Byte-identical for one and two workers, the CSV and the Parquet file cut into many items;
    the documents those items hold are the uncut store's, in its order."""
    inputs = sample_corpus_inputs["prose"]
    one = prepare_dataset(inputs, tmp_path / "one", workers=1, chunk_tokens=50_000, item_bytes=100_000,
                          progress=False)
    two = prepare_dataset(inputs, tmp_path / "two", workers=2, chunk_tokens=50_000, item_bytes=100_000,
                          progress=False)
    assert one == two
    for chunk in one["chunks"]:
        assert (tmp_path / "one" / chunk["file"]).read_bytes() == (tmp_path / "two" / chunk["file"]).read_bytes()
    csv_items = {c["file"].split("-")[1] for c in one["chunks"]
                 if "docstrings.csv" in store.read_chunk(tmp_path / "one" / c["file"]).column("source").to_pylist()}
    assert len(csv_items) >= 4  # the CSV file was read in byte ranges

    def documents(folder, manifest):
        tables = [store.read_chunk(folder / c["file"]) for c in manifest["chunks"]]
        return [row for t in tables for row in zip(*(t.column(n).to_pylist() for n in ("source", "index", "tokens")))]

    assert documents(tmp_path / "one", one) == documents(prose_store, store.read_manifest(prose_store))


def test_rerun_on_unchanged_input_does_nothing(tmp_path, sample_corpus_inputs, capsys):
    inputs = sample_corpus_inputs["code"]
    first = prepare_dataset(inputs, tmp_path / "s", chunk_tokens=CHUNK, workers=1, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").iterdir()}
    again = prepare_dataset(inputs, tmp_path / "s", chunk_tokens=CHUNK, workers=1)
    assert again == first
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").iterdir()} == before


def test_changed_settings_rebuild(tmp_path, sample_corpus_inputs):
    inputs = sample_corpus_inputs["code"]
    small = prepare_dataset(inputs, tmp_path / "s", chunk_tokens=CHUNK, workers=1, progress=False)
    large = prepare_dataset(inputs, tmp_path / "s", chunk_tokens=10**9, workers=1, progress=False)
    assert len(large["chunks"]) == 1 < len(small["chunks"])
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["chunk-00000-00000.arrow",
                                                                   "chunk-00000-00000.idx", "manifest.json"]


class Killed(Exception):
    """Stands for the process dying between two work items."""


def prepare_killed_at(item: int, monkeypatch, inputs, out, dying=lambda out: None) -> None:
    """A one-worker prepare of `inputs` into `out` that dies as work item `item` writes its first
    chunk (after `dying(out)`), the items before it finished."""
    real_write = item_writer.ChunkBuilder._write

    def write_then_die(builder, *job):
        if builder.task.number == item:
            dying(out)
            raise Killed
        real_write(builder, *job)

    monkeypatch.setattr(item_writer.ChunkBuilder, "_write", write_then_die)
    with pytest.raises(Killed):
        prepare_dataset(inputs, out, chunk_tokens=CHUNK, workers=1, progress=False, item_bytes=ITEM)
    monkeypatch.setattr(item_writer.ChunkBuilder, "_write", real_write)


ITEM = 64 << 10  # the prose corpus (Parquet, CSV, text files) in several work items


def test_killed_run_is_invisible_then_resumed_without_redoing_items(tmp_path, sample_corpus_inputs, monkeypatch,
                                                                     capsys):
    inputs, out = sample_corpus_inputs["prose"], tmp_path / "s"
    clean = prepare_dataset(inputs, tmp_path / "clean", chunk_tokens=CHUNK, workers=1, progress=False,
                            item_bytes=ITEM)
    prepare_killed_at(2, monkeypatch, inputs, out,
                      lambda out: (out / ".chunk-00002-00000.arrow.tmp").write_bytes(b"half a chunk"))
    with pytest.raises(BluesError, match="no manifest.json"):
        store.read_manifest(out)
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("chunk-0000[01]-*")}
    assert finished

    resumed = prepare_dataset(inputs, out, chunk_tokens=CHUNK, workers=2, item_bytes=ITEM)
    assert re.search(r"resuming after 2 of \d+ finished work item", capsys.readouterr().out)
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished
    assert resumed == clean
    files = [name for c in clean["chunks"] for name in (c["file"], c["index"]["file"])]
    assert sorted(p.name for p in out.iterdir()) == sorted(files + ["manifest.json"])
    for name in files + ["manifest.json"]:  # the fresh run hashed its sources beside the items, the resumed one first
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name


def slow_sha256(path) -> str:
    """A source's hash that finishes after other work items (a large file's): their journal
    records wait for the run key."""
    if path.suffix == ".csv":
        time.sleep(3.0)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_items_finished_before_the_hashes_wait_for_the_run_key(tmp_path, sample_corpus_inputs, monkeypatch):
    """A fresh run hashes its sources beside the items; here the hashes finish last, so the
    items' journal records wait for the run key. The store is the one-worker store byte for byte
    (a killed run resumed, which hashes first: test_killed_run_is_invisible_then_resumed_...)."""
    inputs = sample_corpus_inputs["prose"]
    prepare_dataset(inputs, tmp_path / "clean", chunk_tokens=CHUNK, workers=1, progress=False, item_bytes=ITEM)
    monkeypatch.setattr(store, "file_sha256", slow_sha256)
    prepare_dataset(inputs, tmp_path / "late", chunk_tokens=CHUNK, workers=2, progress=False, item_bytes=ITEM)
    assert folder_bytes(tmp_path / "late") == folder_bytes(tmp_path / "clean")


def resumed_items(manifest) -> int:
    return len({c["file"].split("-")[1] for c in manifest["chunks"]})


def test_damaged_finished_item_is_redone(tmp_path, sample_corpus_inputs, monkeypatch):
    inputs, out = sample_corpus_inputs["prose"], tmp_path / "s"
    clean = prepare_dataset(inputs, tmp_path / "clean", chunk_tokens=CHUNK, workers=1, progress=False,
                            item_bytes=ITEM)
    prepare_killed_at(2, monkeypatch, inputs, out)
    (out / "chunk-00001-00000.arrow").write_bytes(b"corrupt")
    assert prepare_dataset(inputs, out, chunk_tokens=CHUNK, workers=1, progress=False, item_bytes=ITEM) == clean


def test_store_is_the_same_for_every_worker_count_and_item_plan_is_fixed(tmp_path, sample_corpus_inputs):
    inputs = sample_corpus_inputs["prose"]
    one = prepare_dataset(inputs, tmp_path / "one", chunk_tokens=CHUNK, workers=1, progress=False, item_bytes=ITEM)
    three = prepare_dataset(inputs, tmp_path / "three", chunk_tokens=CHUNK, workers=3, progress=False,
                            item_bytes=ITEM)
    assert one == three and resumed_items(one) > 3
    for chunk in one["chunks"]:
        for name in (chunk["file"], chunk["index"]["file"]):
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes()


def test_read_chunk_and_manifest_errors(tmp_path):
    (tmp_path / "manifest.json").write_text("{half")
    with pytest.raises(BluesError, match="not valid JSON"):
        store.read_manifest(tmp_path)
    (tmp_path / "chunk-00000.arrow").write_bytes(b"junk")
    with pytest.raises(BluesError, match="not a readable Arrow chunk"):
        store.read_chunk(tmp_path / "chunk-00000.arrow")


def test_percentiles_nearest_rank():
    from collections import Counter

    lengths = Counter(range(1, 101))
    assert store.percentiles(lengths) == {"p0": 1, "p10": 10, "p50": 50, "p90": 90, "p99": 99, "p100": 100}


# Bad input, through the command line in-process (`blues prepare` = cli.main).


def run_prepare(capsys, *args):
    code = cli.main(["prepare", *map(str, args)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured


def test_bad_input_missing_path(tmp_path, capsys):
    code, captured = run_prepare(capsys, "--dataset", tmp_path / "nope.jsonl", "--cache_dir", tmp_path / "out")
    assert code == 2 and "nope.jsonl does not exist" in captured.err
    assert not (tmp_path / "out").exists()


def test_bad_input_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, captured = run_prepare(capsys, "--input_dir", tmp_path / "empty", "--cache_dir", tmp_path / "out")
    assert code == 2 and "empty has no files matching" in captured.err
    assert not (tmp_path / "out").exists()


def test_bad_input_field_absent_everywhere(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"body": "a"}\n{"body": "b"}\n')
    code, captured = run_prepare(capsys, "--dataset", tmp_path / "d.jsonl", "--cache_dir", tmp_path / "out")
    assert code == 2
    assert "'text'" in captured.err and "d.jsonl:1" in captured.err and "--text_field" in captured.err
    assert not (tmp_path / "out").exists()


def test_bad_input_invalid_utf8_is_replaced_and_counted(tmp_path, capsys, reference_encoding):
    raw = b"valid start \xff\xfe then \xc3 more text \xe2\x82"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.txt").write_bytes(raw)
    (tmp_path / "in" / "good.txt").write_text("fine text")
    code, _ = run_prepare(capsys, "--input_dir", tmp_path / "in", "--cache_dir", tmp_path / "out")
    assert code == 0
    manifest = store.read_manifest(tmp_path / "out")
    assert manifest["stats"]["replacement_char_docs"] == 1 and manifest["totals"]["docs"] == 2
    table = store.read_chunk(tmp_path / "out" / "chunk-00000-00000.arrow")
    assert table["tokens"][0].as_py() == reference_encoding.encode_ordinary(raw.decode("utf-8", "replace"))


def test_bad_input_malformed_csv_row_skipped(tmp_path, capsys):
    (tmp_path / "d.csv").write_text('text,n\n"good",1\n"bad"x,2\nok,3\n')
    code, _ = run_prepare(capsys, "--dataset", tmp_path / "d.csv", "--cache_dir", tmp_path / "out")
    manifest = store.read_manifest(tmp_path / "out")
    assert code == 0 and manifest["totals"]["docs"] == 2
    assert manifest["skipped"]["malformed_csv"] == {"count": 1, "examples": ["d.csv:3"]}


def test_bad_input_malformed_json_line_skipped(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"text": "one"}\n{"text": oops}\n{"text": "two"}\n')
    code, _ = run_prepare(capsys, "--dataset", tmp_path / "d.jsonl", "--cache_dir", tmp_path / "out")
    manifest = store.read_manifest(tmp_path / "out")
    assert code == 0 and manifest["totals"]["docs"] == 2
    assert manifest["skipped"]["malformed_json"] == {"count": 1, "examples": ["d.jsonl:2"]}


def test_bad_input_empty_documents_skipped_and_counted(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"text": ""}\n{"text": "kept"}\n{"text": "   "}\n')
    code, captured = run_prepare(capsys, "--dataset", tmp_path / "d.jsonl", "--cache_dir", tmp_path / "out")
    manifest = store.read_manifest(tmp_path / "out")
    assert code == 0 and manifest["totals"]["docs"] == 1
    assert manifest["skipped"]["empty"] == {"count": 2, "examples": ["d.jsonl:1", "d.jsonl:3"]}
    assert "'empty': 2" in captured.out


def test_bad_input_only_empty_documents_is_an_error(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"text": ""}\n')
    code, captured = run_prepare(capsys, "--dataset", tmp_path / "d.jsonl", "--cache_dir", tmp_path / "out")
    assert code == 2 and "no documents found" in captured.err and "empty: 1" in captured.err
    assert not (tmp_path / "out").exists()


def test_bad_input_one_50_mb_line(tmp_path, sample_corpus_dir, reference_encoding):
    prose = pq.read_table(sample_corpus_dir / "prose" / "topics.parquet").column("text").to_pylist()
    paragraph = " ".join(" ".join(prose).split())
    text = (paragraph + " ") * (50_000_000 // (len(paragraph) + 1) + 1)
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": text}) + "\n")
    manifest = prepare_dataset([tmp_path / "big.jsonl"], tmp_path / "out", workers=1, progress=False)
    tokens = store.read_chunk(tmp_path / "out" / "chunk-00000-00000.arrow")["tokens"][0].values.to_numpy()
    assert manifest["totals"]["input_bytes"] >= 50_000_000
    assert np.array_equal(tokens, reference_encoding.encode_ordinary(text))


def test_written_files_are_readable_by_others_as_open_would_make_them(tmp_path):
    from blues_train.io.atomic import FILE_MODE, write_atomic

    write_atomic(tmp_path / "f", b"x")
    assert (tmp_path / "f").stat().st_mode & 0o777 == FILE_MODE
