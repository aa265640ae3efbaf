"""`blues verify`: a clean store passes; each fault is found with the right file named."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import select
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
import zstandard
from conftest import FIXTURE_CHUNK_TOKENS

from blues_train import cli
from blues_train.data import store
from blues_train.data.prepare import prepare_dataset
from blues_train.mixture.merge import merge
from blues_train.mixture.verify import verify_paths


@pytest.fixture
def copies(tmp_path, code_store, prose_store):
    """Writable copies of both stores and a mixture of them."""
    code, prose = tmp_path / "code", tmp_path / "prose"
    shutil.copytree(code_store, code)
    shutil.copytree(prose_store, prose)
    merge([code, prose], tmp_path / "mix", weights=[0.7, 0.3], val_fraction=0.1)
    return code, prose, tmp_path / "mix"


def edit_manifest(folder, change, name="manifest.json") -> None:
    manifest = json.loads((folder / name).read_text())
    change(manifest)
    (folder / name).write_text(json.dumps(manifest))


def flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_clean_store_and_mixture(copies, capsys):
    code, prose, mix = copies
    report = verify_paths([mix, code])
    assert report.ok, report.problem_lines()
    assert [d["path"] for d in report.datasets] == [str(code), str(prose)]
    assert report.datasets[0]["tokens"] == json.loads((code / "manifest.json").read_text())["totals"]["tokens"]
    shares = [(s["target"], s["realized"]) for s in report.mixtures[0]["sources"]]
    assert all(abs(t - r) < 0.01 for t, r in shares)
    assert cli.main(["verify", str(mix), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert cli.main(["verify", str(code)]) == 0
    assert "OK: no problems" in capsys.readouterr().out


@pytest.mark.parametrize("fault, file_named, words", [
    (lambda c: flip_byte(c / "chunk-00000-00001.arrow"), "chunk-00000-00001.arrow", "sha256"),
    (lambda c: truncate(c / "chunk-00000-00002.arrow"), "chunk-00000-00002.arrow", "sha256"),
    (lambda c: (c / "chunk-00000-00000.arrow").unlink(), "chunk-00000-00000.arrow", "missing"),
    (lambda c: shutil.copy(c / "chunk-00000-00000.arrow", c / "chunk-00000-00099.arrow"), "chunk-00000-00099.arrow", "stray"),
    (lambda c: flip_byte(c / "chunk-00000-00001.idx"), "chunk-00000-00001.idx", "sha256"),
    (lambda c: (c / "chunk-00000-00002.idx").unlink(), "chunk-00000-00002.idx", "missing"),
    (lambda c: edit_manifest(c, lambda m: m["chunks"][1].update(n_tokens=m["chunks"][1]["n_tokens"] + 1)),
     "manifest.json", "chunks[1].n_tokens"),
])
def test_corruption_is_found_in_the_right_file(copies, capsys, fault, file_named, words):
    code, _, mix = copies
    fault(code)
    report = verify_paths([mix])
    assert any(p.file == str(code / file_named) and words in p.message for p in report.problems), \
        report.problem_lines()
    assert cli.main(["verify", str(code)]) == 1
    out = capsys.readouterr().out
    assert f"{code / file_named}: " in out and "FAILED" in out


def test_source_changed_after_merging(copies, sample_corpus_inputs, tmp_path, capsys):
    """The raw data changes (one document fewer) and the store is prepared again, with the
    same settings, after the mixture was made."""
    code, _, mix = copies
    [raw] = sample_corpus_inputs["code"]
    lines = zstandard.ZstdDecompressor().decompress(raw.read_bytes(), max_output_size=1 << 30).splitlines(True)
    edited = tmp_path / "edited" / raw.name
    edited.parent.mkdir()
    edited.write_bytes(zstandard.ZstdCompressor().compress(b"".join(lines[:-1])))
    shutil.rmtree(code)
    prepare_dataset([edited], code, workers=1, chunk_tokens=FIXTURE_CHUNK_TOKENS, progress=False)
    report = verify_paths([mix])
    assert [p.file for p in report.problems] == [str(code / "manifest.json")]
    assert "changed after merging" in report.problems[0].message
    assert cli.main(["verify", str(mix)]) == 1


def test_token_id_out_of_vocabulary_names_the_row(copies):
    code = copies[0]
    tokens = np.array([5, 6, 7, 200019, 8], dtype=np.uint32)
    data = store.encode_chunk(tokens, np.array([3, 2]), ["stdlib.jsonl.zst"] * 2, [0, 1])
    (code / "chunk-00000-00000.arrow").write_bytes(data)

    def point_at_new_chunk(manifest):
        manifest["chunks"][0].update(sha256=hashlib.sha256(data).hexdigest(),
                                     n_docs=2, n_tokens=5, bytes=len(data))
        del manifest["chunks"][0]["index"]  # as a store prepared before the document index
        manifest["totals"]["docs"] = sum(c["n_docs"] for c in manifest["chunks"])
        manifest["totals"]["tokens"] = sum(c["n_tokens"] for c in manifest["chunks"])
        manifest["fingerprint"] = store.store_fingerprint(manifest)

    edit_manifest(code, point_at_new_chunk)
    problems = verify_paths([code]).problem_lines()
    assert problems == [f"{code / 'chunk-00000-00000.arrow'}: row 1: token id 200019 >= n_vocab 200019 "
                        "(1 such ids in this chunk)"]


def test_edited_mixture_is_found(copies):
    mix = copies[2]
    edit_manifest(mix, lambda m: m["sources"][0].update(tokens=m["sources"][0]["tokens"] + 10), "mixture.json")
    lines = verify_paths([mix]).problem_lines()
    assert any(str(mix / "mixture.json") in line and "edited after merging" in line for line in lines)


def test_not_a_store(tmp_path):
    report = verify_paths([tmp_path, tmp_path / "nowhere"])
    assert [p.file for p in report.problems] == [str(tmp_path / "manifest.json"), str(tmp_path / "nowhere")]


@pytest.mark.parametrize("from_end", [1, 50, 200, 400, 700])
def test_flipped_byte_anywhere_is_reported_not_a_crash(copies, from_end):
    code = copies[0]
    chunk = code / "chunk-00000-00000.arrow"
    data = bytearray(chunk.read_bytes())
    data[len(data) - from_end] ^= 0xFF
    chunk.write_bytes(bytes(data))
    report = verify_paths([code])
    assert not report.ok
    assert any(str(chunk) in str(p.file) and "sha256" in p.message for p in report.problems)


def run_blues_with_stderr_on(stderr, *args):
    blues = str(Path(sys.executable).parent / "blues")
    return subprocess.run([blues, *args], stdout=subprocess.PIPE, stderr=stderr, timeout=300, check=True).stdout


def test_progress_bar_on_a_terminal_only_and_stdout_unchanged(code_store, tmp_path):
    """`blues verify` draws its bar on stderr when stderr is a terminal, none otherwise; stdout
    (what scripts parse) is the same either way."""
    plain = run_blues_with_stderr_on(subprocess.PIPE, "verify", str(code_store))
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # tqdm draws nothing 0 wide
    try:
        watched = run_blues_with_stderr_on(terminal, "verify", str(code_store))
        drawn = b""
        while select.select([master], [], [], 0.5)[0]:
            drawn += os.read(master, 65536)
    finally:
        os.close(terminal)
        os.close(master)
    assert watched == plain and b"OK: no problems" in plain and b"chunk" not in plain
    assert f"verify {code_store.name}".encode() in drawn and b"chunk" in drawn
