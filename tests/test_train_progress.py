"""What a training run tells the person watching it: where it stands, when it ends, what a
CPU step costs, and a resume that changes the learning-rate schedule.

The reference run (tests/training_runs.py) is one rank on the CPU, 8 steps of 4 micro-batches;
two resumes of its last checkpoint with a larger --max_steps check the schedule.
"""

from __future__ import annotations

import time

import pytest
from training_runs import STEPS, one_rank, records

from blues_train.training.metrics import duration
from blues_train.training.train import SCHEDULER_NOT_STARTED, cpu_cost

pytestmark = pytest.mark.slow


def test_step_lines_say_how_far_and_when_it_ends(reference_run):
    _, result = reference_run
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ") and " | loss " in line]
    assert [line.split(" | ")[0] for line in steps] == [f"step {s}/{STEPS}" for s in range(1, STEPS + 1)]
    assert all(" | ETA " in line for line in steps[:-1]) and " | ETA " not in steps[-1]


def test_a_cpu_run_says_what_a_step_costs_at_the_start(reference_run):
    _, result = reference_run
    lines = result.stdout.splitlines()
    [cost] = [line for line in lines if line.startswith("on cpu one micro-batch took")]
    assert "per step of 4 micro-batches" in cost and f"for {STEPS} steps" in cost
    assert lines.index(cost) < next(i for i, line in enumerate(lines) if line.startswith("step 1/"))


def test_a_slow_cpu_step_gets_a_batch_that_fits():
    """The issue's run: blues-01's default 524,288 tokens per step, micro-batch 8 x seq_len 256,
    about 14 s per micro-batch on a laptop CPU."""
    line = cpu_cost(14.0, grad_accum=256, steps=5, micro_batch_tokens=8 * 256)
    assert "about 59m44s per step of 256 micro-batches, 4h58m for 5 steps" in line
    assert "for steps of about 14s pass --global_batch_tokens 2048" in line
    assert "pass" not in cpu_cost(2.0, grad_accum=4, steps=8, micro_batch_tokens=32)
    assert "--global_batch_tokens 4096" in cpu_cost(5.0, grad_accum=64, steps=8, micro_batch_tokens=2048)


def test_deepspeed_noise_is_gone(reference_run):
    _, result = reference_run
    output = result.stdout + result.stderr
    for noise in (SCHEDULER_NOT_STARTED, "Setting accelerator to CPU", "deepspeed_shm_comm"):
        assert noise not in output


def test_metrics_record_wall_clock_time(reference):
    times = [r["time"] for r in records(reference)]
    assert times == sorted(times) and time.time() - 3600 < times[0] <= times[-1] <= time.time()


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (42.4, 130, 3 * 3600 + 5 * 60, 2 * 86400 + 4 * 3600)] == \
        ["42s", "2m10s", "3h05m", "2d04h"]


def lrs(out) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in records(out)}


def test_resume_with_more_steps_warns_or_keeps_the_schedule(mixture_dir, reference, tmp_path):
    last = reference / "checkpoints" / f"step-{STEPS:06d}"
    stretched = one_rank(mixture_dir, tmp_path / "stretched", "--resume", str(last), "--max_steps", "10")
    assert f"pass --lr_schedule_steps {STEPS} to keep the original schedule" in stretched.stdout
    kept = one_rank(mixture_dir, tmp_path / "kept", "--resume", str(last), "--max_steps", "10",
                    "--lr_schedule_steps", str(STEPS))
    assert "warning" not in kept.stdout
    floor = lrs(reference)[STEPS]  # the original schedule ends at its floor (cos_min_ratio x lr) and stays
    assert lrs(tmp_path / "kept") == pytest.approx({9: floor, 10: floor})
    assert lrs(tmp_path / "stretched")[9] > 1.2 * floor  # step 9 of 10 on the stretched cosine
