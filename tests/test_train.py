"""End-to-end training on the CPU: tiny model, real sample data, DeepSpeed with gloo ranks.

DeepSpeed is slow to start, so a few runs are shared by the assertions (tests/training_runs.py):
    reference   `python -m blues_train.training.train`, one rank, 8 steps, checkpoints at 4 and 8
    two_ranks   the same under `deepspeed --num_gpus 2` (two CPU ranks, same global batch)
    killed      `blues train`, SIGKILLed after its first checkpoint, then `--resume auto`
With --micro_batch 1 every micro-batch is one window, on one rank as on two, so the runs
must agree up to the order of float additions.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from training_runs import BIN, MODEL, ROOT, STEPS, TRAIN_ARGS, assert_close, checked, env, losses, one_rank, records, two_ranks

from blues_train.training.checkpoint import complete_checkpoints

pytestmark = pytest.mark.slow


def test_loss_falls_and_metrics_are_complete(reference):
    recs = records(reference)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.0, [r["loss"] for r in recs]
    for key in ("lr", "grad_norm", "tokens_per_s", "aux_loss", "z_loss", "experts"):
        assert key in recs[0]
    assert {"val_loss", "val_perplexity"} <= set(recs[3]) and "val_loss" not in recs[2]
    layer = recs[-1]["experts"][0]
    assert layer["layer"] == 1 and sum(layer["share"]) == pytest.approx(1.0, abs=1e-3)
    assert layer["max_load"] >= 1.0 >= layer["min_load"] and layer["entropy"] > 0
    assert list((reference / "tensorboard").iterdir())


def test_checkpoints_are_complete_consolidated_and_pruned(reference, mixture_dir):
    from safetensors.torch import load_file

    kept = complete_checkpoints(reference / "checkpoints")
    assert [p.name for p in kept] == ["step-000004", "step-000008"]
    assert not [p for p in (reference / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    meta = json.loads((kept[-1] / "meta.json").read_text())
    mixture = json.loads((mixture_dir / "mixture.json").read_text())
    assert meta["step"] == STEPS and meta["world_size"] == 1
    assert meta["mixture"]["fingerprint"] == mixture["fingerprint"]
    assert meta["loader"]["windows"] == STEPS * 4 and meta["code_version"]
    d_model = json.loads(Path(MODEL).read_text())["d_model"]
    assert json.loads((kept[-1] / "config.json").read_text())["d_model"] == d_model
    weights = load_file(str(kept[-1] / "model.safetensors"))
    assert weights["embed.weight"].shape == (200064, d_model)


def test_two_ranks_match_one_rank(reference, two_rank_run):
    out, result = two_rank_run
    assert "2 rank(s)" in result.stdout
    assert_close(losses(out), losses(reference), range(1, STEPS + 1))
    val = {r["step"]: r["val_loss"] for r in records(out) if "val_loss" in r}
    ref_val = {r["step"]: r["val_loss"] for r in records(reference) if "val_loss" in r}
    assert_close(val, ref_val, (4, 8))


def test_killed_run_resumes_exactly(mixture_dir, reference, tmp_path):
    out = tmp_path / "killed"
    cmd = [str(BIN / "blues"), "train", "--data_cache_dir", str(mixture_dir), "--out", str(out), *TRAIN_ARGS]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not complete_checkpoints(out / "checkpoints") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = complete_checkpoints(out / "checkpoints")
    assert saved and saved[-1].name != f"step-{STEPS:06d}", "the run finished before it was killed"

    half = out / "checkpoints" / "step-000007"  # a folder whose save never finished
    (half / "deepspeed").mkdir(parents=True)
    (half / "model.safetensors").write_bytes(b"partial")
    result = checked(subprocess.run(cmd + ["--resume", "auto"], cwd=ROOT, env=env(), capture_output=True,
                                    text=True, timeout=300))
    assert f"resumed at step {int(saved[-1].name[5:])}" in result.stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # the steps after the checkpoint were rewritten, not repeated
    assert losses(out) == losses(reference)


def test_checkpoint_moves_between_world_sizes(mixture_dir, reference, two_rank_run, tmp_path):
    two_out, _ = two_rank_run
    one_rank(mixture_dir, tmp_path / "2to1", "--resume", str(two_out / "checkpoints" / "step-000004"))
    assert sorted(losses(tmp_path / "2to1")) == [5, 6, 7, 8]
    assert_close(losses(tmp_path / "2to1"), losses(reference), range(5, STEPS + 1))

    result = two_ranks(mixture_dir, tmp_path / "1to2", "--resume", str(reference / "checkpoints" / "step-000004"))
    assert "resumed at step 4: 2 rank(s)" in result.stdout
    assert_close(losses(tmp_path / "1to2"), losses(reference), range(5, STEPS + 1))


def test_resume_may_switch_gradient_checkpointing_on(mixture_dir, reference, tmp_path):
    """A run-time knob, not architecture: the resumed run continues the same losses."""
    one_rank(mixture_dir, tmp_path / "ckpt", "--resume", str(reference / "checkpoints" / "step-000004"),
             "--gradient_checkpointing")
    assert sorted(losses(tmp_path / "ckpt")) == [5, 6, 7, 8]
    assert_close(losses(tmp_path / "ckpt"), losses(reference), range(5, STEPS + 1))
