"""Object storage end to end, over a real S3 protocol (moto's server on 127.0.0.1).

prepare from s3://raw/… in every input format -> stores on S3 (byte-identical to local ones)
-> merge on S3 -> verify -> `blues train` reading the mixture from S3 and saving to S3 ->
resume from S3 -> generate from the S3 checkpoint. Faults: SIGKILL during an S3 prepare, a
corrupted chunk object, a missing bucket, refused credentials, a second writer.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import zstandard
from conftest import FIXTURE_CHUNK_TOKENS
from s3_server import moto_server, s3_env, upload_tree
from training_runs import ROOT, env

from blues_train.data.prepare import prepare_dataset
from blues_train.io import storage
from blues_train.io.chunk_files import ChunkFiles
from blues_train.io.errors import BluesError
from blues_train.io.folder_lock import object_lease
from blues_train.mixture.verify import verify_paths

BLUES = [sys.executable, "-m", "blues_train.cli"]


def blues(*args, timeout=300, extra_env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*BLUES, *map(str, args)], cwd=ROOT, env={**env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def corpus(s3, sample_corpus_dir, tmp_path_factory):
    """The sample corpus (JSONL.zst, Parquet, CSV, text) plus a plain JSONL file, in s3://raw/corpus/."""
    extra = tmp_path_factory.mktemp("jsonl") / "notes.jsonl"
    lines = [json.dumps({"text": f"note {i}: object storage has no rename <|endoftext|> " * (i % 7 + 1)})
             for i in range(200)]
    extra.write_text("\n".join(lines) + "\n")
    upload_tree(s3.client, sample_corpus_dir, s3.bucket("raw"), "corpus")
    s3.client.upload_file(str(extra), "raw", "corpus/extra/notes.jsonl")
    s3.bucket("data")
    s3.bucket("runs")
    return {"local": sample_corpus_dir, "jsonl": extra}


@pytest.fixture(scope="module")
def s3_stores(corpus):
    """Stores prepared from s3://raw into s3://data: code (JSONL.zst), prose (Parquet, CSV,
    text folder), notes (JSONL)."""
    inputs = {"code": ["s3://raw/corpus/code/stdlib.jsonl.zst"],
              "prose": ["s3://raw/corpus/prose/topics.parquet", "s3://raw/corpus/prose/docstrings.csv",
                        "s3://raw/corpus/prose/texts"],
              "notes": ["s3://raw/corpus/extra/notes.jsonl"]}
    for name, given in inputs.items():
        prepare_dataset(given, f"s3://data/{name}", workers=1, chunk_tokens=FIXTURE_CHUNK_TOKENS, progress=False)
    return {name: f"s3://data/{name}" for name in inputs}


def assert_same_store(remote: str, local) -> None:
    """Manifest, every chunk and every document index byte-identical."""
    manifest = storage.read_bytes(f"{remote}/manifest.json")
    assert manifest == (local / "manifest.json").read_bytes()
    files = [name for chunk in json.loads(manifest)["chunks"] for name in (chunk["file"], chunk["index"]["file"])]
    for name in files:
        assert storage.read_bytes(f"{remote}/{name}") == (local / name).read_bytes()
    left = [uri for uri, _, _ in storage.list_files(remote)]
    assert sorted(storage.path(u).name for u in left) == sorted(["manifest.json", *files])  # no lease, no journal


def test_every_input_format_from_s3_gives_the_local_store(s3_stores, code_store, prose_store, corpus, tmp_path):
    assert_same_store(s3_stores["code"], code_store)
    assert_same_store(s3_stores["prose"], prose_store)
    local_notes = tmp_path / "notes"
    prepare_dataset([corpus["jsonl"]], local_notes, workers=1, chunk_tokens=FIXTURE_CHUNK_TOKENS, progress=False)
    assert_same_store(s3_stores["notes"], local_notes)
    formats = {s["format"] for name in ("code", "prose", "notes")
               for s in json.loads(storage.read_bytes(f"{s3_stores[name]}/manifest.json"))["sources"]}
    assert formats == {"jsonl.zst", "parquet", "csv", "text", "jsonl"}


def test_rerun_on_s3_does_nothing(s3_stores, capsys):
    prepare_dataset(["s3://raw/corpus/code/stdlib.jsonl.zst"], s3_stores["code"], workers=1,
                    chunk_tokens=FIXTURE_CHUNK_TOKENS)
    assert "up to date" in capsys.readouterr().out


def test_merge_and_verify_on_s3(s3_stores):
    mixture = "s3://data/mixture"
    ok(blues("merge", "--datasets", s3_stores["code"], s3_stores["prose"], s3_stores["notes"],
             "--weights", "0.5", "0.3", "0.2", "--val_fraction", "0.05", "--output", mixture))
    recorded = json.loads(storage.read_bytes(f"{mixture}/mixture.json"))
    assert [s["path"] for s in recorded["sources"]] == [s3_stores[n] for n in ("code", "prose", "notes")]
    report = json.loads(ok(blues("verify", mixture, "--json")).stdout)
    assert report["ok"] and {d["path"] for d in report["datasets"]} == set(s3_stores.values())


def test_loader_reads_s3_mixture_through_a_bounded_cache(s3_stores, mixture_dir, tmp_path):
    """The same windows as from local files; the cache never holds more than its bound (plus
    the chunk being read); start-up reads only index objects, chunks come as windows need
    them, and a second loader on a warm cache downloads nothing."""
    from blues_train.mixture.loader import PackedSequenceDataset
    from blues_train.mixture.merge import merge

    merge([s3_stores["code"], s3_stores["prose"]], "s3://data/loader-mixture", val_fraction=0.05)
    local = PackedSequenceDataset(mixture_dir, 64)
    largest = max(c["bytes"] for name in ("code", "prose")
                  for c in json.loads(storage.read_bytes(f"{s3_stores[name]}/manifest.json"))["chunks"])
    files = ChunkFiles(tmp_path / "cache", max_bytes=2 * largest)
    remote = PackedSequenceDataset("s3://data/loader-mixture", 64, chunk_files=files)
    n = remote.num_windows(0)
    assert n == local.num_windows(0)
    for a, b in zip(iter(local), [w for w, _ in zip(iter(remote), range(n))]):
        assert (a == b).all()
    assert sum(p.stat().st_size for p in (tmp_path / "cache").glob("*.arrow")) <= 3 * largest
    cold = ChunkFiles(tmp_path / "warm", max_bytes=1 << 30)
    started = PackedSequenceDataset("s3://data/loader-mixture", 64, chunk_files=cold, index_cache_dir=tmp_path / "plans")
    assert cold.downloads == 0
    next(iter(started))
    assert cold.downloads > 0
    again = PackedSequenceDataset("s3://data/loader-mixture", 64, chunk_files=ChunkFiles(tmp_path / "warm"))
    next(iter(again))
    assert again.chunk_files.downloads == 0


def test_corrupted_chunk_object_is_named_by_verify_and_refused_by_the_loader(s3, s3_stores, tmp_path):
    source = s3_stores["code"]
    target = "s3://data/corrupt"
    for uri, _, _ in storage.list_files(source):
        storage.write_bytes(f"{target}/{storage.path(uri).name}", storage.read_bytes(uri))
    chunk = f"{target}/chunk-00000-00001.arrow"
    data = bytearray(storage.read_bytes(chunk))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(chunk, bytes(data))
    report = verify_paths([target])
    assert [p.file for p in report.problems] == [chunk]
    assert "sha256" in report.problems[0].message
    result = blues("verify", target)
    assert result.returncode == 1 and chunk in result.stdout
    files = ChunkFiles(tmp_path / "cache")
    with pytest.raises(BluesError, match="chunk-00000-00001.arrow: sha256"):
        files.local(storage.path(chunk), json.loads(storage.read_bytes(f"{target}/manifest.json"))["chunks"][1]
                    ["sha256"], len(data))


def test_sigkill_during_s3_prepare_then_the_same_command_completes_it(corpus, s3, tmp_path):
    """Killed mid-run: no manifest (no visible store), chunks and journal objects left; the same
    command lists them, checks their hashes, redoes the rest: the store of an uninterrupted run.
    The input, plain JSONL on S3, is cut into byte ranges that the workers read themselves."""
    plain = tmp_path / "stdlib.jsonl"
    plain.write_bytes(zstandard.ZstdDecompressor().decompressobj().decompress(
        (corpus["local"] / "code" / "stdlib.jsonl.zst").read_bytes()))
    s3.client.upload_file(str(plain), "raw", "plain/stdlib.jsonl")
    out = "s3://data/killed"
    command = ["prepare", "--dataset", "s3://raw/plain/stdlib.jsonl", "--cache_dir", out,
               "--workers", 1, "--chunk_tokens", 4000, "--item_bytes", 100_000]
    proc = subprocess.Popen([*BLUES, *map(str, command)], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(storage.list_files(f"{out}/.prepare-journal", "item-*.json")) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not storage.path(f"{out}/manifest.json").exists()
    assert storage.path(f"{out}/.blues-writer.json").exists()  # the dead writer's lease is left behind
    resumed = ok(blues("prepare", *command[1:]))
    assert "resuming after" in resumed.stdout
    prepare_dataset([plain], tmp_path / "clean", workers=2, chunk_tokens=4000, progress=False, item_bytes=100_000)
    assert storage.read_bytes(f"{out}/manifest.json") == (tmp_path / "clean" / "manifest.json").read_bytes()
    for local in (tmp_path / "clean").iterdir():
        assert storage.read_bytes(f"{out}/{local.name}") == local.read_bytes()


def test_missing_bucket_is_one_line(corpus):
    line = one_line_error(blues("prepare", "--dataset", "s3://raw/corpus/extra/notes.jsonl",
                                "--cache_dir", "s3://no-such-bucket/store"))
    assert "--cache_dir s3://no-such-bucket/store: bucket no-such-bucket does not exist" in line
    line = one_line_error(blues("prepare", "--dataset", "s3://no-such-bucket/notes.jsonl", "--cache_dir", "s3://data/x"))
    assert "no-such-bucket" in line
    line = one_line_error(blues("train", "--data_cache_dir", "s3://no-such-bucket/mixture", "--out", "s3://runs/x"))
    assert "s3://no-such-bucket/mixture/mixture.json" in line


def test_refused_credentials_are_one_line(tmp_path):
    """A server that checks signatures (moto with authentication on) refuses unknown keys."""
    with moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as endpoint:
        settings = {**s3_env(endpoint), "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1"}
        result = blues("verify", "s3://data/code", extra_env=settings, timeout=120)
        line = one_line_error(result)
        assert ("refused the credentials" in line or "access denied" in line) and "AWS_ACCESS_KEY_ID" in line
        result = blues("merge", "--datasets", "s3://data/code", "--output", "s3://data/m", extra_env=settings,
                       timeout=120)
        line = one_line_error(result)
        assert ("refused the credentials" in line or "access denied" in line) and "s3://data/" in line


def test_second_writer_is_refused_by_the_lease(s3_stores):
    folder = storage.path("s3://data/leased")
    with object_lease(folder):
        result = blues("merge", "--datasets", s3_stores["code"], "--output", str(folder))
        line = one_line_error(result)
        assert "s3://data/leased is being written by pid" in line and str(os.getpid()) in line
        with pytest.raises(BluesError, match="is being written by"):
            with object_lease(folder):
                pass
    assert not (folder / ".blues-writer.json").exists()
    ok(blues("merge", "--datasets", s3_stores["code"], "--output", str(folder)))


def test_raw_corpus_on_s3_is_observed_by_size_and_etag(corpus, s3):
    """What the Dagster sensor keys observations by: a rewritten object changes the signature."""
    from blues_train.data import raw_corpus

    inputs = ["s3://raw/corpus/extra"]
    files = raw_corpus.list_files(inputs, glob="**/*.jsonl")
    assert [(f.label, f.mtime_ns) for f in files] == [("extra/notes.jsonl", 0)] and files[0].etag
    before = raw_corpus.signature(files)
    data = storage.read_bytes("s3://raw/corpus/extra/notes.jsonl")
    storage.write_bytes("s3://raw/corpus/extra/notes2.jsonl", data)
    storage.write_bytes("s3://raw/corpus/extra/notes.jsonl", data.replace(b"note 1:", b"note I:"))
    after = raw_corpus.list_files(inputs, glob="notes.jsonl")
    assert after[0].bytes == files[0].bytes and after[0].etag != files[0].etag
    assert raw_corpus.signature(after) != before
    storage.write_bytes("s3://raw/corpus/extra/notes.jsonl", data)
    storage.path("s3://raw/corpus/extra/notes2.jsonl").unlink()
    assert raw_corpus.observe(inputs, glob="**/*.jsonl")[0].sha256 == storage.sha256(corpus["jsonl"])


def test_paths_and_uris():
    assert storage.path("file:///tmp/x") == storage.path("/tmp/x") and not storage.is_remote("/tmp/x")
    uri = storage.path("s3://bucket//a/b/")
    assert str(uri) == "s3://bucket/a/b" and uri.name == "b" and str(uri.parent) == "s3://bucket/a"
    assert str(uri / "c.arrow") == "s3://bucket/a/b/c.arrow" and uri.bucket == "bucket"
    assert storage.display("s3://bucket/a") == "s3://bucket/a"
    with pytest.raises(TypeError):
        open(uri)  # noqa: SIM115 (a remote path is never opened as a local file by mistake)
    for bad, message in (("ftp://host/x", "unknown scheme"), ("s3://", "names no bucket")):
        with pytest.raises(BluesError, match=message):
            storage.path(bad)


@pytest.mark.slow
def test_readme_object_storage_tour_runs_as_written(s3, tmp_path):
    """The README's tour on a bucket, every command as written, against the session's server:
    prepare from s3:// (JSONL.zst, Parquet, CSV, text), merge, verify, train 4 steps from and
    to S3, resume from S3, generate from the S3 checkpoint; then what the bucket holds."""
    s3.bucket("blues-demo")
    tour = commands(readme_block("### Paths and object storage"))
    assert [c.split()[1] for c in tour] == ["sample-corpus", "prepare", "prepare", "merge", "verify", "train",
                                            "train", "generate"]
    path = f"{sys.executable.rsplit('/', 1)[0]}{os.pathsep}{os.environ['PATH']}"
    output = []
    for command in tour:
        result = subprocess.run(command, shell=True, cwd=ROOT, env={**env(), "PATH": path},
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        assert "Traceback" not in result.stderr, command
        output.append(result.stdout)
    assert output[-1].startswith("def parse(")
    out, mixture = "s3://blues-demo/runs/demo", "s3://blues-demo/data_cache/merged"
    assert "from scratch" in output[5] and f"uploaded {out}/checkpoints/step-000004" in output[5]
    assert "resumed at step 4" in output[6]
    steps = [json.loads(line)["step"] for line in storage.read_bytes(f"{out}/metrics.jsonl").decode().splitlines()]
    assert steps == list(range(1, 7))
    names = {storage.path(u).relative_to(storage.path(out)).as_posix() for u, _, _ in storage.list_files(out)}
    kept = sorted(n.split("/")[1] for n in names if n.startswith("checkpoints/") and n.endswith("/meta.json"))
    assert kept == ["step-000004", "step-000006"]
    assert ".blues-writer.json" not in names  # the lease is released
    meta = json.loads(storage.read_bytes(f"{out}/checkpoints/step-000006/meta.json"))
    assert meta["mixture"]["path"] == mixture and meta["step"] == 6
    saved = {n.removeprefix("checkpoints/step-000006/") for n in names if n.startswith("checkpoints/step-000006/")}
    assert saved == {*meta["files"], "meta.json"}
    for name, digest in meta["files"].items():  # every file listed is there, as recorded
        assert storage.sha256(f"{out}/checkpoints/step-000006/{name}") == digest
    scratch = blues("train", "--data_cache_dir", mixture, "--out", out, "--model", "tiny", "--max_steps", 8)
    assert "already holds checkpoints up to step-000006" in one_line_error(scratch)
    # Lineage reads the run's records, the mixture and the checkpoint on the bucket.
    lineage = json.loads(ok(blues("lineage", "--run", out, "--step", 5, "--json", "--loss", "--checkpoint", out)).stdout)
    assert lineage["step"] == 5 and lineage["documents"]
    assert all(math.isfinite(d["mean_loss"]) for d in lineage["documents"])
    exported = ok(blues("export", "--checkpoint", out, "--out", tmp_path / "export", "--dtype", "float32"))
    assert (tmp_path / "export" / "model.safetensors").is_file(), exported.stdout
    assert "an export is written to a local folder" in one_line_error(
        blues("export", "--checkpoint", out, "--out", "s3://blues-demo/exports/demo"))


def readme_block(heading: str) -> str:
    """The first fenced block after `heading` in the README."""
    text = (ROOT / "README.md").read_text()
    return re.search(r"```\n(.*?)```", text[text.index(heading):], re.DOTALL).group(1)


def commands(block: str) -> list[str]:
    """The block's commands, continuation lines joined."""
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip()]


def test_stale_lease_is_taken_over_and_a_lost_lease_stops_the_commit(s3, monkeypatch):
    from blues_train.io import folder_lock

    folder = storage.path("s3://data/stale-lease")
    lease = folder / folder_lock.LEASE_FILE
    storage.write_bytes(lease, json.dumps({"owner": "pid 1 (elsewhere)", "host": "another-host", "pid": 1,
                                           "expires": time.time() - 1}).encode())
    with object_lease(folder) as held:  # expired: taken over
        assert json.loads(lease.read_bytes())["token"] == held.token
    storage.write_bytes(lease, json.dumps({"owner": "pid 1 (elsewhere)", "host": "another-host", "pid": 1,
                                           "expires": time.time() + 600}).encode())
    with pytest.raises(BluesError, match=r"is being written by pid 1 \(elsewhere\)"):
        with object_lease(folder):
            pass
    lease.unlink()
    monkeypatch.setattr(folder_lock, "LEASE_SECONDS", 0.4)  # renewed every 0.1 s
    with object_lease(folder) as held:
        storage.write_bytes(lease, b'{"owner": "an intruder"}')  # another writer took it over
        deadline = time.monotonic() + 10
        while held.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(BluesError, match="another writer took over the lease"):
            folder_lock.check_held(folder)
    assert json.loads(lease.read_bytes()) == {"owner": "an intruder"}  # not deleted: it is not ours
