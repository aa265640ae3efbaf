"""One writer per folder: a second prepare, merge or train into a folder being written fails
at once naming the writer; a writer killed by SIGKILL leaves no stale lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from training_runs import BIN, ROOT, TRAIN_ARGS, env

from blues_train import cli
from blues_train.io.folder_lock import exclusive_writer
from blues_train.mixture.merge import merge


def busy(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert f"is being written by pid {os.getpid()} (started " in err, err
    return err


def test_second_prepare_fails_at_once(tmp_path, sample_corpus_inputs, capsys):
    out = tmp_path / "store"
    with exclusive_writer(out):
        err = busy(capsys, ["prepare", "--dataset", str(sample_corpus_inputs["code"][0]),
                            "--cache_dir", str(out), "--workers", "1"])
        assert err.startswith(f"error: {out} is being written")
        assert list(out.iterdir()) == []  # nothing of the refused run, and no lock file
    assert not out.exists()  # the holder wrote nothing: it leaves no folder either


def test_second_merge_fails_at_once(tmp_path, code_store, prose_store, capsys):
    out = tmp_path / "mixture"
    merge([code_store, prose_store], out)
    before = (out / "mixture.json").read_bytes()
    capsys.readouterr()
    with exclusive_writer(out):
        busy(capsys, ["merge", "--datasets", str(code_store), "--output", str(out)])
    assert (out / "mixture.json").read_bytes() == before


@pytest.mark.slow
def test_second_training_run_fails_at_once(tmp_path, mixture_dir):
    out = tmp_path / "run"
    cmd = [str(BIN / "blues"), "train", "--data_cache_dir", str(mixture_dir), "--out", str(out), *TRAIN_ARGS]
    with exclusive_writer(out):
        started = time.monotonic()
        result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"error: {out} is being written by pid {os.getpid()}" in result.stderr
    assert time.monotonic() - started < 30  # refused before DeepSpeed starts
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_a_killed_writer_leaves_no_stale_lock(tmp_path):
    folder = tmp_path / "store"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom blues_train.io.folder_lock import exclusive_writer\n"
         f"with exclusive_writer({str(folder)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Exception, match=f"pid {holder.pid}"):
        with exclusive_writer(folder):
            pass
    holder.kill()
    holder.wait()
    with exclusive_writer(folder):  # the kernel released it with the process
        pass
