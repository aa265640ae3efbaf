"""No code runs from a checkpoint: copies of real checkpoints whose every `.pt` holds a
pickle that would run a command are refused by resume (same and other world size),
`blues generate` and the evaluation behind `model_eval`, and the command never runs.

Two attackers: one who only replaces the `.pt` files (the sha256s in meta.json name the
changed file), and one who also rewrites meta.json's hashes (the weights-only loader refuses
the pickle itself)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from training_runs import BIN, ROOT, TRAIN_ARGS, env

from blues_train.io.errors import BluesError
from blues_train.serving.report import evaluate_checkpoint
from blues_train.training import checkpoint

pytestmark = pytest.mark.slow


class Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def poisoned_copy(source, dest, marker, *, rehash: bool):
    """A copy of checkpoint `source` with a payload in every .pt; with `rehash`, meta.json's
    hashes describe the poisoned files."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(checkpoint.UNIVERSAL_DIR))
    pts = sorted(dest.rglob("*.pt"))
    assert pts
    for pt in pts:
        torch.save({"module": Payload(marker), "optimizer_state_dict": Payload(marker)}, pt)
    if rehash:
        meta = checkpoint.read_meta(dest)
        meta["files"] = checkpoint.file_hashes(dest)
        (dest / checkpoint.META_FILE).write_text(json.dumps(meta))
    return dest


def resume(mixture_dir, folder, out, *launcher):
    cmd = [*(launcher or [str(BIN / "blues"), "train"]), "--data_cache_dir", str(mixture_dir),
           "--out", str(out), *TRAIN_ARGS, "--resume", str(folder)]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)


def refused(result, *phrases):
    assert result.returncode != 0, result.stdout[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors, result.stderr[-3000:]
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


def test_resume_refuses_changed_files_before_reading_them(mixture_dir, reference, tmp_path):
    marker = tmp_path / "pwned"
    folder = poisoned_copy(reference / "checkpoints" / "step-000004", tmp_path / "ckpt", marker, rehash=False)
    line = refused(resume(mixture_dir, folder, tmp_path / "out"), "changed since the checkpoint was saved",
                   ".pt")
    assert str(folder) in line
    assert not marker.exists()


def test_resume_refuses_pickled_code_even_with_matching_hashes(mixture_dir, reference, tmp_path):
    marker = tmp_path / "pwned"
    folder = poisoned_copy(reference / "checkpoints" / "step-000004", tmp_path / "ckpt", marker, rehash=True)
    line = refused(resume(mixture_dir, folder, tmp_path / "out"), "refused to load", "posix.system")
    assert ".pt" in line and "Traceback" not in line
    assert not marker.exists()


def test_cross_world_size_conversion_refuses_pickled_code(mixture_dir, two_rank_run, tmp_path):
    two_out, _ = two_rank_run
    marker = tmp_path / "pwned"
    source = two_out / "checkpoints" / "step-000004"
    changed = poisoned_copy(source, tmp_path / "changed", marker, rehash=False)
    refused(resume(mixture_dir, changed, tmp_path / "out1"), "changed since the checkpoint was saved")
    rehashed = poisoned_copy(source, tmp_path / "rehashed", marker, rehash=True)
    refused(resume(mixture_dir, rehashed, tmp_path / "out2", str(BIN / "python"), "-m", "blues_train.training.train"),
            "refused to load")
    assert not marker.exists()
    assert not (rehashed / checkpoint.UNIVERSAL_DIR).exists()


def test_generate_and_evaluation_refuse_a_changed_checkpoint(mixture_dir, reference, tmp_path):
    marker = tmp_path / "pwned"
    changed = poisoned_copy(reference / "checkpoints" / "step-000008", tmp_path / "changed", marker, rehash=False)
    generate = [str(BIN / "blues"), "generate", "--checkpoint", str(changed), "--prompt", "def", "--max_length", "2"]
    result = subprocess.run(generate, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    refused(result, "changed since the checkpoint was saved")
    with pytest.raises(BluesError, match="changed since the checkpoint was saved"):
        evaluate_checkpoint(changed, mixture_dir, seq_len=32, windows=2, prompts=["def"], max_length=2,
                            temperature=0.0, top_k=0)
    # generate reads only model.safetensors and config.json: with matching hashes it works, safely
    rehashed = poisoned_copy(reference / "checkpoints" / "step-000008", tmp_path / "rehashed", marker, rehash=True)
    generate[3] = str(rehashed)
    result = subprocess.run(generate, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not marker.exists()


def test_missing_and_extra_files_are_named(reference, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(reference / "checkpoints" / "step-000008", folder)
    checkpoint.verify_files(folder)  # the saved checkpoint as it is: fine
    (folder / "deepspeed" / "state" / "extra_optim_states.pt").write_bytes(b"x")
    with pytest.raises(BluesError, match="extra_optim_states.pt: not part of the checkpoint"):
        checkpoint.verify_files(folder)
    (folder / "deepspeed" / "state" / "extra_optim_states.pt").unlink()
    (folder / checkpoint.CONFIG_FILE).unlink()
    with pytest.raises(BluesError, match="config.json: missing"):
        checkpoint.verify_files(folder)


def test_checkpoint_files_share_the_umask_mode(reference):
    folder = reference / "checkpoints" / "step-000008"
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes
