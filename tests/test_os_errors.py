"""The operating system's refusals are user errors: a full disk (a small tmpfs), a read-only
file system and a folder without write permission give one line naming the path and the
cause, a non-zero exit, and nothing half-written that looks valid.

Mounting needs root (CI and the development machines run as root); elsewhere these skip."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from training_runs import BIN, ROOT, TRAIN_ARGS, env

from blues_train import cli
from blues_train.data import store


def mount_tmpfs(where, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                            capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'})")


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB file system."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where = tmp_path / "small"
    mount_tmpfs(where, "256k")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def read_only(small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    return small_disk


def one_line_error(capsys, argv, *phrases) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def prepare_argv(inputs, out) -> list[str]:
    return ["prepare", "--dataset", str(inputs["code"][0]), "--cache_dir", str(out), "--workers", "1",
            "--chunk_tokens", "8192"]


def test_prepare_on_a_full_disk(small_disk, sample_corpus_inputs, capsys):
    out = small_disk / "store"
    line = one_line_error(capsys, prepare_argv(sample_corpus_inputs, out),
                          "no space left on device while writing", str(out))
    assert "free some space" in line
    assert not (out / store.MANIFEST).exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert cli.main(["verify", str(out)]) == 1  # no manifest: not a dataset
    capsys.readouterr()


def test_prepare_and_merge_on_a_read_only_file_system(read_only, sample_corpus_inputs, code_store, capsys):
    one_line_error(capsys, prepare_argv(sample_corpus_inputs, read_only / "store"),
                   f"--cache_dir {read_only / 'store'}: read-only file system while writing {read_only}")
    one_line_error(capsys, ["merge", "--datasets", str(code_store), "--output", str(read_only / "mixture")],
                   "read-only file system while", str(read_only / "mixture"))


def test_merge_on_a_full_disk(small_disk, code_store, prose_store, capsys):
    (small_disk / "filler").write_bytes(b"\0" * (256 << 10))  # raises no error: tmpfs truncates
    line = one_line_error(capsys, ["merge", "--datasets", str(code_store), str(prose_store),
                                   "--output", str(small_disk / "mixture")],
                          "no space left on device while writing", "mixture.json")
    assert not (small_disk / "mixture" / "mixture.json").exists()
    assert line


def test_prepare_without_permission(tmp_path, sample_corpus_inputs):
    """Root ignores permissions; without CAP_DAC_OVERRIDE (setpriv) it obeys them like a user."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv (util-linux) to give up the permission override")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--",
           str(BIN / "blues"), *prepare_argv(sample_corpus_inputs, locked / "store")]
    result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"error: --cache_dir {locked / 'store'}: permission denied while writing {locked}" in result.stderr


@pytest.mark.slow
def test_checkpoint_save_on_a_full_disk(tmp_path, mixture_dir):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "24m")  # room for the logs, not for a tiny model's checkpoint
    try:
        out = disk / "run"
        cmd = [str(BIN / "blues"), "train", "--data_cache_dir", str(mixture_dir), "--out", str(out),
               *TRAIN_ARGS, "--max_steps", "1", "--save_interval", "1"]
        result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert errors and "no space left on device while saving the checkpoint" in errors[0], result.stderr
        assert "Traceback" not in result.stderr
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == []  # the .tmp- folder is gone
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk, leave: int) -> None:
    """Take all but about `leave` bytes of a tmpfs."""
    total = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\1" * max(total - leave, 0))


def test_index_cache_on_a_full_disk_is_one_line(tmp_path, mixture_dir):
    """The loader's tables are written in place through a mapping: a full disk must be an
    error when the file is sized (its space reserved), not SIGBUS when a page is written.
    Two pages are left: enough for a sparse file's first and last page, not for the table."""
    from blues_train.io.errors import BluesError
    from blues_train.mixture.loader import PackedSequenceDataset

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    table = PackedSequenceDataset(mixture_dir, 64, index_cache_dir=tmp_path / "whole").documents
    assert table.nbytes + 128 > 2 * 4096  # the premise: a page between the header's and the last
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "4m")
    try:
        fill(disk, 2 * 4096)
        with pytest.raises(BluesError, match="no space left on device while writing .*index cache"):
            PackedSequenceDataset(mixture_dir, 64, index_cache_dir=disk / "cache")
        # nothing half-written: only the small chunk tables (mixture_chunks) fitted
        assert not list((disk / "cache").rglob("*.tmp"))
        assert {p.name.split("-")[0] for p in (disk / "cache").rglob("*.npy")} <= {"chunks"}
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_ranks_decompress_in_memory_where_token_files_cannot_be_written(tmp_path, mixture_dir):
    """A multi-rank loader whose index cache turned read-only (its tables built) reads its
    windows by decompressing chunks itself: the same windows, no error, no token file."""
    from blues_train.mixture.loader import PackedSequenceDataset
    from reference import take

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    single = PackedSequenceDataset(mixture_dir, 64, index_cache_dir=tmp_path / "single")
    expected = take(single, 40)
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "16m")
    try:
        PackedSequenceDataset(mixture_dir, 64, rank=1, world_size=2, index_cache_dir=disk).num_windows(0)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        rank1 = PackedSequenceDataset(mixture_dir, 64, rank=1, world_size=2, index_cache_dir=disk)
        assert all((a == b).all() for a, b in zip(take(rank1, 20), expected[1::2]))
        assert not list(disk.rglob("tokens-*"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
