"""Hostile inputs: each is skipped with a reason or refused in one line, never a traceback."""

from __future__ import annotations

import json
import os
import random
import shutil
import zlib
from pathlib import Path

import pytest
import zstandard

from blues_train import cli
from blues_train.data import store
from blues_train.data.sources import SkipLog, discover_sources, iter_documents
from blues_train.io.errors import BluesError
from blues_train.mixture.loader import PackedSequenceDataset
from blues_train.mixture.merge import merge


def read_all(inputs, **kwargs):
    skips = SkipLog()
    docs = list(iter_documents(discover_sources(inputs, **kwargs), "text", skips))
    return docs, skips.as_dict()


def blues(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def prepare(capsys, inputs, out, *flags) -> dict:
    args = ["prepare", *[a for i in inputs for a in ("--input_dir", i)], "--cache_dir", out,
            "--workers", "1", *flags]
    code, _, err = blues(capsys, *args)
    assert code == 0, err
    return json.loads((Path(out) / "manifest.json").read_text())


def stored_docs(store_dir) -> list[tuple[str, int]]:
    rows = []
    for chunk in store.read_manifest(store_dir)["chunks"]:
        table = store.read_chunk(store.chunk_path(store_dir, chunk))
        rows += zip(table.column("source").to_pylist(), table.column("index").to_pylist())
    return rows


DEEP_ARRAY = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a": ' * 100_000 + b"1" + b"}" * 100_000


@pytest.mark.parametrize("name", ["deep.jsonl", "deep.jsonl.zst"])
def test_deeply_nested_json_line_is_malformed_json(tmp_path, capsys, name):
    data = b'{"text": "before"}\n' + DEEP_ARRAY + b"\n" + DEEP_OBJECT + b'\n{"text": "after"}\n'
    if name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    (tmp_path / name).write_bytes(data)
    code, _, err = blues(capsys, "prepare", "--dataset", tmp_path / name, "--cache_dir",
                         tmp_path / "store", "--workers", "1")
    assert code == 0, err
    manifest = store.read_manifest(tmp_path / "store")
    assert manifest["skipped"]["malformed_json"] == {"count": 2, "examples": [f"{name}:2", f"{name}:3"]}
    assert stored_docs(tmp_path / "store") == [(name, 0), (name, 3)]


def test_file_with_non_utf8_name_is_skipped_and_the_rest_tokenized(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("a good document")
    with open(os.fsencode(corpus) + b"/bad\xff.txt", "wb") as fh:
        fh.write(b"text behind a bad name")
    manifest = prepare(capsys, [corpus], tmp_path / "store", "--glob", "**/*")
    assert manifest["skipped"]["non_utf8_name"] == {"count": 1, "examples": ["corpus/bad\\xff.txt"]}
    assert stored_docs(tmp_path / "store") == [("corpus/good.txt", 0)]
    code, out, _ = blues(capsys, "verify", tmp_path / "store")
    assert code == 0, out


def test_symlink_out_of_the_folder_is_followed_under_its_own_name(tmp_path, capsys):
    corpus, elsewhere = tmp_path / "data" / "corpus", tmp_path / "elsewhere"
    (corpus / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (corpus / "a.txt").write_text("an ordinary file")
    (elsewhere / "far.txt").write_text("a file outside the corpus")
    (corpus / "sub" / "link.txt").symlink_to(elsewhere / "far.txt")
    (corpus / "dangling.txt").symlink_to(elsewhere / "gone.txt")
    sources = discover_sources([corpus])
    assert [(s.label, s.real_path) for s in sources] == [
        ("corpus/a.txt", None), ("corpus/sub/link.txt", str(elsewhere / "far.txt"))]
    prepare(capsys, [corpus], tmp_path / "store")
    assert stored_docs(tmp_path / "store") == [("corpus/a.txt", 0), ("corpus/sub/link.txt", 0)]


def test_labels_of_plain_files_keep_the_old_rule(sample_corpus_inputs):
    """Labels are stored in chunks: a change would change every existing store's fingerprint."""
    inputs = [p.parent for p in sample_corpus_inputs["prose"]] + sample_corpus_inputs["code"]
    sources = discover_sources(inputs, glob="**/*")
    root = Path(os.path.commonpath([Path(i).resolve().parent for i in inputs]))
    assert len(sources) > 3
    assert [s.label for s in sources] == [s.path.resolve().relative_to(root).as_posix() for s in sources]
    assert all(s.real_path is None for s in sources)


def png_bytes() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = (1).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b"")


def test_binary_files_are_skipped_text_with_a_few_bad_bytes_is_kept(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(shutil.which("ls"), corpus / "ls")
    (corpus / "image.png").write_bytes(png_bytes())
    noise = random.Random(0)
    (corpus / "noise.bin").write_bytes(bytes(noise.randrange(1, 256) for _ in range(20_000)))
    text = ("Ein Café am Straßenrand, " * 400).encode("utf-8") + b"\xff\xfe latin-1: caf\xe9\n"
    (corpus / "notes.txt").write_bytes(text)
    docs, skips = read_all([corpus], glob="**/*")
    assert [d.source for d in docs] == ["corpus/notes.txt"]
    assert skips["binary"] == {"count": 3, "examples": ["corpus/image.png", "corpus/ls", "corpus/noise.bin"]}


def test_manifest_chunk_file_must_be_a_plain_name(tmp_path, capsys, code_store):
    good = tmp_path / "good"
    shutil.copytree(code_store, good)
    merge([good], tmp_path / "mix", val_fraction=0.1)
    first = store.read_manifest(good)["chunks"][0]["file"]
    shutil.copy(good / first, tmp_path / "x.arrow")  # a real chunk: only the path is wrong
    for name, bad in (("abs", "/etc/passwd"), ("up", "../x.arrow")):
        broken = tmp_path / name
        shutil.copytree(code_store, broken)
        edit_chunk_file(broken, bad)
        code, out, _ = blues(capsys, "verify", broken)
        assert code == 1 and "chunks[0].file" in out and bad in out, out
        code, _, err = blues(capsys, "merge", "--datasets", broken, "--output", tmp_path / f"m-{name}")
        assert code == 2 and err.count("\n") == 1 and "chunks[0].file" in err, err
        with pytest.raises(BluesError, match=r"manifest.json: chunks\[0\].file"):
            store.read_manifest(broken)
    edit_chunk_file(good, "../x.arrow")
    with pytest.raises(BluesError, match=r"chunks\[0\].file"):
        PackedSequenceDataset(tmp_path / "mix", 64)
    edit_chunk_file(good, first, index="../x.idx")
    with pytest.raises(BluesError, match=r"chunks\[0\].index.file: not a file name .*'../x.idx'"):
        PackedSequenceDataset(tmp_path / "mix", 64, index_cache_dir=tmp_path / "plans")
    code, out, _ = blues(capsys, "verify", good)
    assert code == 1 and "chunks[0].index.file" in out, out


def edit_chunk_file(store_dir: Path, name: str, index: str | None = None) -> None:
    manifest = json.loads((store_dir / "manifest.json").read_text())
    manifest["chunks"][0]["file"] = name
    if index is not None:
        manifest["chunks"][0]["index"]["file"] = index
    (store_dir / "manifest.json").write_text(json.dumps(manifest))


def test_same_sources_prepared_with_other_chunk_tokens_are_one_dataset(tmp_path, capsys):
    corpus, other = tmp_path / "corpus", tmp_path / "other"
    for folder, word in ((corpus, "alpha"), (other, "omega")):
        folder.mkdir()
        for i in range(6):
            (folder / f"{i}.txt").write_text(f"{word} document number {i} " * 20)
    a, b, c = tmp_path / "A", tmp_path / "B", tmp_path / "C"
    prepare(capsys, [corpus], a, "--chunk_tokens", "100")
    prepare(capsys, [corpus], b, "--chunk_tokens", "300")
    prepare(capsys, [other], c, "--chunk_tokens", "100")
    assert store.read_manifest(a)["fingerprint"] != store.read_manifest(b)["fingerprint"]
    code, _, err = blues(capsys, "merge", "--datasets", a, b, "--output", tmp_path / "M")
    assert code == 2 and err.count("\n") == 1 and "given twice" in err, err
    assert str(a) in err and str(b) in err
    code, _, err = blues(capsys, "merge", "--datasets", a, c, "--output", tmp_path / "M")
    assert code == 0, err
