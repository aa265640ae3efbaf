"""A bucket or a folder never makes Blues write, read or delete outside what the user named.

Names read from a checkpoint's meta.json, a store's manifest or a bucket's keys become paths
only inside their folder (`storage.inside`); `blues export` writes into folders it makes
itself and replaces only an earlier export of its own. Real checkpoints (the `reference`
run), a real S3 protocol (the moto `s3` server), real exports.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from s3_server import upload_tree
from test_s3 import blues, one_line_error
from training_runs import TRAIN_ARGS

from blues_train.io import storage
from blues_train.io.chunk_files import ChunkFiles
from blues_train.io.errors import BluesError
from blues_train.serving import export
from blues_train.training import remote_run

ESCAPE = "../" * 40  # more parents than any test folder has: from there, a path from /


def upload_checkpoint(s3, reference: Path, run: str, tamper) -> str:
    """The reference run's last checkpoint as s3://paths/RUN/checkpoints/step-000008, its
    meta.json changed by `tamper(meta)` (which may also upload objects); returns the run URI."""
    folder = reference / "checkpoints" / "step-000008"
    upload_tree(s3.client, folder, s3.bucket("paths"), f"{run}/checkpoints/step-000008")
    meta = json.loads((folder / "meta.json").read_text())
    tamper(meta)
    s3.client.put_object(Bucket="paths", Key=f"{run}/checkpoints/step-000008/meta.json", Body=json.dumps(meta))
    return f"s3://paths/{run}"


def test_train_resume_auto_refuses_a_bucket_meta_json_naming_a_file_outside(s3, reference, mixture_dir, tmp_path):
    victim = tmp_path / "victim.txt"
    name = ESCAPE + str(victim).lstrip("/")

    def tamper(meta):
        meta["files"][name] = "0" * 64
        s3.client.put_object(Bucket="paths", Key=f"escape/checkpoints/step-000008/{name}", Body=b"written outside")

    out = upload_checkpoint(s3, reference, "escape", tamper)
    result = blues("train", "--data_cache_dir", mixture_dir, "--out", out, "--resume", "auto", *TRAIN_ARGS[:2],
                   "--max_steps", "9")
    error = one_line_error(result)
    assert "meta.json: files" in error and repr(name) in error and "use another checkpoint" in error
    assert not victim.exists()


def test_fetch_model_refuses_a_sha256_that_names_a_folder_outside_the_cache(s3, reference):
    cache = storage.cache_root() / "checkpoints"
    escaped = "../../escaped-by-a-sha256-value"  # fetch_model names its folder after 32 characters

    def tamper(meta):
        meta["files"]["model.safetensors"] = escaped + "0" * 32

    out = upload_checkpoint(s3, reference, "sha-escape", tamper)
    with pytest.raises(BluesError, match=r"meta\.json: the sha256 of model\.safetensors '\.\./\.\./escaped"):
        remote_run.fetch_model(out)
    assert not (cache / escaped).resolve().exists()


def test_a_store_manifest_sha256_never_names_a_cache_file_outside(s3, code_store, tmp_path):
    upload_tree(s3.client, code_store, s3.bucket("paths"), "store")
    manifest = json.loads((code_store / "manifest.json").read_text())
    chunk = manifest["chunks"][0]
    planted = tmp_path / "planted.arrow"  # what the escaping name points at: not the chunk to read
    shutil.copyfile(code_store / chunk["file"], planted)
    (tmp_path / "cache").mkdir()
    files = ChunkFiles(tmp_path / "cache")
    with pytest.raises(BluesError, match=r"store/manifest\.json: sha256 of chunk-00000-00000\.arrow '\.\./planted"):
        files.local(storage.path(f"s3://paths/store/{chunk['file']}"), "../planted", chunk["bytes"])


@pytest.fixture
def checkpoint_folder(reference) -> Path:
    return reference / "checkpoints" / "step-000008"


def test_export_never_follows_a_tmp_symlink_nor_deletes_a_foreign_old_folder(checkpoint_folder, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep me")
    out = tmp_path / "exports" / "hf"
    out.parent.mkdir()
    (out.parent / ".tmp-hf").symlink_to(victim)
    foreign_old = out.parent / ".old-hf"
    foreign_old.mkdir()
    (foreign_old / "notes.txt").write_text("not an export")
    export.export(checkpoint_folder, out, "float32")
    export.export(checkpoint_folder, out, "float32")  # over its own earlier export
    assert json.loads((out / export.EXPORT_FILE).read_text())["source"]["step"] == 8
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    assert (foreign_old / "notes.txt").read_text() == "not an export"
    assert sorted(p.name for p in out.parent.iterdir()) == [".old-hf", ".tmp-hf", "hf"]


def test_export_refuses_an_out_that_is_a_symlink_or_not_an_export(checkpoint_folder, tmp_path):
    earlier = tmp_path / "earlier"
    export.export(checkpoint_folder, earlier, "float32")
    before = sorted(p.name for p in earlier.iterdir())
    link = tmp_path / "link"
    link.symlink_to(earlier)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_text("someone else's")
    for out, message in ((link, "is a symbolic link"), (foreign, "is not a folder blues export wrote")):
        error = one_line_error(blues("export", "--checkpoint", checkpoint_folder, "--out", out))
        assert message in error
    assert link.is_symlink() and sorted(p.name for p in earlier.iterdir()) == before
    assert (foreign / "model.safetensors").read_text() == "someone else's"


def test_a_store_chunk_that_is_a_link_out_of_the_store_is_refused(code_store, tmp_path):
    """Only a chunk name that is a symbolic link is resolved: one leading out of the store is
    refused, one to a file inside it, or a store folder reached through a link, is read."""
    from blues_train.data import store

    copy = tmp_path / "store"
    shutil.copytree(code_store, copy)
    first = store.read_manifest(copy)["chunks"][0]["file"]
    (copy / "inside-copy").write_bytes((copy / first).read_bytes())
    (copy / first).unlink()
    (copy / first).symlink_to(copy / "inside-copy")
    (tmp_path / "via-link").symlink_to(copy)
    for folder in (copy, tmp_path / "via-link"):
        assert store.read_manifest(folder)["chunks"][0]["file"] == first
    (tmp_path / "outside").write_bytes((copy / "inside-copy").read_bytes())
    (copy / first).unlink()
    (copy / first).symlink_to(tmp_path / "outside")
    with pytest.raises(BluesError, match=f"chunks\\[0\\].file '{first}': leads outside .* through a symbolic link"):
        store.read_manifest(copy)
