"""Errors that say what happened: a network failure is not missing data, a hostile JSON file
is one line naming it, a mixture or manifest edited by hand is refused field by field, and an
S3 prepare's leftover journal is cleaned or reported."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys

import pytest
from s3_server import upload_tree
from training_runs import ROOT, env

from blues_train.data import store
from blues_train.io import storage
from blues_train.io.errors import BluesError
from blues_train.mixture.merge import merge

BLUES = [sys.executable, "-m", "blues_train.cli"]
UNREACHABLE = {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "blues-test-key",
               "AWS_SECRET_ACCESS_KEY": "blues-test-secret", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "1"}  # one try: fail in a second


def blues(*args, extra_env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*BLUES, *map(str, args)], cwd=ROOT, env={**env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


@pytest.fixture
def unreachable(monkeypatch):
    """This process' object store is an endpoint where nothing listens."""
    for name, value in UNREACHABLE.items():
        monkeypatch.setenv(name, value)
    storage._FILESYSTEMS.clear()
    yield
    storage._FILESYSTEMS.clear()


@pytest.fixture(scope="module")
def s3_mixture(s3, code_store, tmp_path_factory):
    """A local mixture of a store on S3 (the fixture's code store, uploaded)."""
    upload_tree(s3.client, code_store, s3.bucket("clear-errors"), "code")
    out = tmp_path_factory.mktemp("s3_mixture")
    merge(["s3://clear-errors/code"], out)
    return out


# 5. an unreachable endpoint is not missing data

def test_unreachable_endpoint_is_not_a_missing_store(unreachable):
    with pytest.raises(BluesError) as caught:
        store.read_manifest("s3://clear-errors/code")
    message = str(caught.value)
    assert "cannot reach the object store at http://127.0.0.1:1" in message
    assert "prepare" not in message and "not a token store" not in message


def test_train_against_an_unreachable_endpoint_says_so(s3_mixture):
    for mixture in (s3_mixture, "s3://clear-errors/mixture"):
        result = blues("train", "--data_cache_dir", mixture, "--out", s3_mixture / "run", extra_env=UNREACHABLE)
        line = one_line_error(result)
        assert "cannot reach the object store at http://127.0.0.1:1" in line and "AWS_ENDPOINT_URL" in line
        assert "prepare" not in line and "merge" not in line, line


# 6. JSON nested too deep for the parser is one line naming the file

DEEP = "[" * 100_000 + "]" * 100_000


def test_deep_json_in_any_file_blues_reads_is_one_line(tmp_path, code_store, mixture_dir, capsys):
    from blues_train.cli import main as blues_main
    from blues_train.mixture.spec import read_mixture
    from blues_train.training.config import from_flags
    from pipelines.config import load_project_config

    deep_store, deep_mixture, deep = tmp_path / "store", tmp_path / "mixture", tmp_path / "deep.json"
    shutil.copytree(code_store, deep_store)
    deep_mixture.mkdir()
    for file in (deep_store / "manifest.json", deep_mixture / "mixture.json", deep):
        file.write_text(DEEP)
    for read, file in ((lambda: store.read_manifest(deep_store), deep_store / "manifest.json"),
                       (lambda: read_mixture(deep_mixture), deep_mixture / "mixture.json"),
                       (lambda: from_flags(["--training_config", str(deep)]), f"--training_config {deep}"),
                       (lambda: load_project_config(deep), deep)):
        with pytest.raises(BluesError, match=f"^{re.escape(str(file))}: not valid JSON \\(nested too deeply"):
            read()
    assert blues_main(["merge", "--datasets", str(deep_store), str(code_store), "--output", str(tmp_path / "m")]) == 2
    assert blues_main(["verify", str(deep_mixture)]) == 1
    out, err = capsys.readouterr()
    assert err == f"error: {deep_store / 'manifest.json'}: not valid JSON (nested too deeply to parse)\n"
    assert f"{deep_mixture / 'mixture.json'}: not valid JSON (nested too deeply to parse)" in out


# 9. every field of mixture.json (and of a store's manifest.json) is checked

def edited_mixture(mixture_dir, folder, edit):
    mixture = json.loads((mixture_dir / "mixture.json").read_text())
    edit(mixture)
    folder.mkdir()
    (folder / "mixture.json").write_text(json.dumps(mixture))  # NaN written as NaN, as json.dumps does
    return folder


@pytest.mark.parametrize("edit, problem", [
    pytest.param(lambda m: m["sources"][0].update(weight=math.nan), "sources[0].weight: input should be a finite number",
                 id="nan-weight"),
    pytest.param(lambda m: m["tokenizer"].update(n_vocab=100277), "tokenizer.n_vocab 100277 differs", id="n_vocab"),
    pytest.param(lambda m: m.update(seed="0"), "seed: input should be a valid integer", id="seed-text"),
    pytest.param(lambda m: m["validation"].update(fraction=1.5), "validation.fraction: input should be less than 1",
                 id="fraction"),
    pytest.param(lambda m: m.update(weigths=[1.0]), "weigths is not a known setting; did you mean weights?",
                 id="unknown-key"),
    pytest.param(lambda m: m["sources"][1].pop("fingerprint"), "sources[1].fingerprint is required",
                 id="missing-fingerprint"),
])
def test_verify_refuses_a_mixture_with_a_bad_field(mixture_dir, tmp_path, capsys, edit, problem):
    from blues_train.cli import main as blues_main

    folder = edited_mixture(mixture_dir, tmp_path / "mixture", edit)
    assert blues_main(["verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert f"{folder / 'mixture.json'}: {problem}" in out and "OK: no problems" not in out, out


def test_verify_refuses_a_store_manifest_with_a_bad_field(code_store, tmp_path, capsys):
    from blues_train.cli import main as blues_main

    edited = tmp_path / "store"
    shutil.copytree(code_store, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["chunks"][0]["n_tokens"] = -5
    (edited / "manifest.json").write_text(json.dumps(manifest))
    assert blues_main(["verify", str(edited)]) == 1
    out = capsys.readouterr().out
    assert f"{edited / 'manifest.json'}: chunks[0].n_tokens: input should be greater than or equal to 0" in out


def test_mixtures_and_stores_as_written_still_load(mixture_dir, code_store):
    from blues_train.mixture.spec import read_mixture

    assert read_mixture(mixture_dir)["kind"] == "mixture"
    assert store.read_manifest(code_store)["kind"] == "token_store"


# 11. the journal of an S3 prepare killed right after its manifest is reported, then cleaned

class Killed(BaseException):
    """The process dying at this point (the journal's removal)."""


def test_journal_left_after_the_manifest_is_reported_then_removed(s3, sample_corpus_inputs, monkeypatch, capsys):
    from conftest import FIXTURE_CHUNK_TOKENS

    from blues_train.data.prepare import prepare_dataset
    from blues_train.mixture.verify import format_report, verify_paths

    out = f"s3://{s3.bucket('clear-errors')}/killed-after-manifest"
    journal = f"{out}/.prepare-journal"

    def prepare():
        return prepare_dataset(sample_corpus_inputs["code"], out, workers=1, chunk_tokens=FIXTURE_CHUNK_TOKENS)

    def die(given):
        raise Killed
    monkeypatch.setattr(storage, "remove_tree", die)
    with pytest.raises(Killed):
        prepare()
    monkeypatch.undo()
    assert storage.path(f"{out}/manifest.json").is_file() and len(storage.list_files(journal)) > 1
    report = verify_paths([out])
    assert report.problem_lines() == [f"{journal}: journal of a prepare run killed after writing manifest.json: "
                                      "run the same `blues prepare` again to remove it"]
    capsys.readouterr()
    manifest = prepare()
    assert "up to date" in capsys.readouterr().out and manifest == store.read_manifest(out)
    assert not storage.path(journal).exists() and storage.list_files(journal) == []
    assert "OK: no problems" in format_report(verify_paths([out]))
