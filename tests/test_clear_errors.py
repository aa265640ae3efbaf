"""Errors that say what happened: a network failure is not missing data, a hostile JSON file
is one line naming it, a mixture or manifest edited by hand is refused field by field, and an
S3 prepare's leftover journal is cleaned or reported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from s3_server import upload_tree
from training_runs import ROOT, env

from blues_train import storage, store
from blues_train.errors import BluesError
from blues_train.merge import merge

BLUES = [sys.executable, "-m", "blues_train.cli"]
UNREACHABLE = {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "blues-test-key",
               "AWS_SECRET_ACCESS_KEY": "blues-test-secret", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "1"}  # one try: fail in a second


def blues(*args, extra_env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*BLUES, *map(str, args)], cwd=ROOT, env={**env(2), **(extra_env or {})},
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
