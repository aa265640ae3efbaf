"""A resume never overwrites a checkpoint (issue 21, items 3 and 4).

- Resuming a checkpoint into an `--out` that holds later checkpoints moves them (and a copy of
  `metrics.jsonl`) to `checkpoints/abandoned-after-step-N/`, whichever folder the resumed
  checkpoint lives in; resuming another run's checkpoint (another mixture or model) over an
  `--out`'s own is refused unless `--resume_into_existing`.
- On S3, a run whose writer lease another writer took over uploads nothing and exits non-zero
  with one line, leaving the new holder's committed checkpoint as it was.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
from training_runs import ROOT, TRAIN_ARGS, env, one_rank, records

from blues_model import BluesConfig
from blues_train.io import storage
from blues_train.io.errors import BluesError
from blues_train.io.folder_lock import LEASE_FILE, object_lease
from blues_train.training import checkpoint
from blues_train.training.remote_run import RemoteRun

BLUES = [sys.executable, "-m", "blues_train.cli"]


def blues_train(mixture_dir, out, *extra, wait=True):
    command = [*BLUES, "train", "--data_cache_dir", str(mixture_dir), "--out", str(out), *TRAIN_ARGS, *map(str, extra)]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)


def one_line_error(result) -> str:
    assert result.returncode != 0, result.stdout[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def folder_bytes(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fake_checkpoint(root, step: int, model: str = "tiny"):
    """A complete checkpoint folder as `check_start` reads it: meta.json with step and identity."""
    folder = root / checkpoint.step_name(step)
    (folder / checkpoint.DEEPSPEED_DIR / checkpoint.DEEPSPEED_TAG).mkdir(parents=True)
    (folder / checkpoint.MODEL_FILE).write_bytes(b"weights")
    meta = {"step": step, "mixture": {"fingerprint": "m1"}, "model_config": {"name": model}}
    (folder / checkpoint.META_FILE).write_text(json.dumps(meta))
    return folder


def test_resume_from_another_folder_sets_later_checkpoints_aside(tmp_path):
    run, other = tmp_path / "A" / "checkpoints", tmp_path / "B" / "checkpoints"
    fake_checkpoint(run, 4)
    later = fake_checkpoint(run, 8)
    before = folder_bytes(later)
    resumed = fake_checkpoint(other, 4)
    aside = checkpoint.check_start(run, resumed, set_aside=True)
    assert aside == run / "abandoned-after-step-000004"
    assert folder_bytes(aside / "step-000008") == before
    assert [p.name for p in checkpoint.complete_checkpoints(run)] == ["step-000004"]
    fake_checkpoint(run, 8)  # set aside again at the same step: a new folder, the first kept
    assert checkpoint.check_start(run, resumed, set_aside=True) == run / "abandoned-after-step-000004.2"
    assert folder_bytes(aside / "step-000008") == before


def test_another_runs_checkpoint_needs_resume_into_existing(tmp_path):
    run = tmp_path / "A" / "checkpoints"
    own = [fake_checkpoint(run, 2, model="small"), fake_checkpoint(run, 8, model="small")]
    resumed = fake_checkpoint(tmp_path / "B" / "checkpoints", 4)
    with pytest.raises(BluesError, match="holds checkpoints of another run .*--resume_into_existing"):
        checkpoint.check_start(run, resumed, set_aside=True)
    assert checkpoint.complete_checkpoints(run) == own
    aside = checkpoint.check_start(run, resumed, set_aside=True, into_existing=True)
    assert sorted(p.name for p in aside.iterdir()) == ["step-000002", "step-000008"]  # the earlier one too
    assert checkpoint.complete_checkpoints(run) == []


def test_resuming_another_folders_checkpoint_keeps_the_later_ones(mixture_dir, reference, tmp_path):
    """The issue's case: --out A holds step 8, --resume B/step-4 trains to step 8 again."""
    out, source = tmp_path / "A", tmp_path / "B" / "step-000004"
    shutil.copytree(reference, out)
    shutil.copytree(reference / "checkpoints" / "step-000004", source)
    old_step8 = folder_bytes(out / "checkpoints" / "step-000008")
    old_log = (out / "metrics.jsonl").read_bytes()
    result = blues_train(mixture_dir, out, "--resume", source)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    aside = out / "checkpoints" / "abandoned-after-step-000004"
    assert folder_bytes(aside / "step-000008") == old_step8
    assert (aside / "metrics.jsonl").read_bytes() == old_log
    assert checkpoint.is_complete(out / "checkpoints" / "step-000008")
    assert [r["step"] for r in records(out)] == list(range(1, 9))


def test_another_runs_checkpoint_is_refused_then_moved_aside_when_asked(mixture_dir, reference, tmp_path):
    """--out C holds a run of another model; resuming the reference's step 4 there is refused,
    and with --resume_into_existing C's checkpoint moves aside (not deleted)."""
    model = tmp_path / "wider.json"
    model.write_text(json.dumps({**BluesConfig.preset("tiny").to_dict(), "ffn_hidden": 192}))
    out = tmp_path / "C"
    one_rank(mixture_dir, out, "--model", model, "--max_steps", "2")
    own = folder_bytes(out / "checkpoints")
    resume = reference / "checkpoints" / "step-000004"
    line = one_line_error(blues_train(mixture_dir, out, "--resume", resume))
    assert "holds checkpoints of another run" in line and "--resume_into_existing" in line
    assert folder_bytes(out / "checkpoints") == own
    result = blues_train(mixture_dir, out, "--resume", resume, "--resume_into_existing", "--max_steps", 4)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    aside = out / "checkpoints" / "abandoned-after-step-000004"
    kept = folder_bytes(aside)
    kept.pop("metrics.jsonl")
    assert kept == own
    assert [r["step"] for r in records(aside)] == [1, 2]


def upload_folder(local, remote) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file() and path.name != checkpoint.META_FILE:
            storage.upload(path, remote / path.relative_to(local).as_posix())
    storage.upload(local / checkpoint.META_FILE, remote / checkpoint.META_FILE)  # committed last


def remote_bytes(folder) -> dict:
    return {storage.path(uri).relative_to(folder).as_posix(): storage.read_bytes(uri)
            for uri, _, _ in storage.list_files(folder)}


def test_a_checkpoint_committed_by_another_writer_is_not_overwritten(s3, reference, tmp_path):
    s3.bucket("runs")
    mirror = RemoteRun("s3://runs/committed-meanwhile")
    target = mirror.checkpoints / "step-000004"
    upload_folder(reference / "checkpoints" / "step-000008", target)  # another writer's step 4
    theirs = remote_bytes(target)
    with object_lease(mirror.remote):
        with pytest.raises(BluesError, match="another writer committed this checkpoint"):
            mirror.push_checkpoint(reference / "checkpoints" / "step-000004", keep_last=2)
    assert remote_bytes(target) == theirs
    assert not storage.list_files(mirror.uploads)


def test_a_writer_that_lost_its_lease_overwrites_nothing(s3, mixture_dir, reference):
    """Another writer takes the lease (and commits its own step 4) once the run has started
    training: the run uploads no byte, fails with one line, and the holder's checkpoint stays
    as committed."""
    s3.bucket("runs")
    out = storage.path("s3://runs/lost-lease")
    lease = out / LEASE_FILE
    loser = blues_train(mixture_dir, out, "--seed", 1, wait=False)  # other weights than the holder's
    started = ""
    while "training from scratch" not in started:  # the lease is held, step 1 is next
        started = loser.stdout.readline()
        assert started or loser.poll() is None, loser.communicate()
    intruder = json.dumps({"owner": "pid 1 (the new holder)", "host": "elsewhere", "pid": 1,
                           "expires": time.time() + 600}).encode()
    storage.write_bytes(lease, intruder)
    holder = out / "checkpoints" / "step-000004"
    upload_folder(reference / "checkpoints" / "step-000004", holder)
    committed = remote_bytes(holder)
    stdout, stderr = loser.communicate(timeout=300)
    line = one_line_error(subprocess.CompletedProcess(loser.args, loser.returncode, stdout, stderr))
    assert "another writer took over the lease" in line and str(out) in line
    assert remote_bytes(holder) == committed
    meta = json.loads(committed[checkpoint.META_FILE])
    for name, digest in meta["files"].items():
        assert storage.sha256(holder / name) == digest
    assert not [uri for uri, _, _ in storage.list_files(out / "checkpoints") if "/.upload-" in uri]
    assert lease.read_bytes() == intruder  # not deleted: it is not the run's
