"""Real training runs shared by the tests: a small model, real sample data, DeepSpeed on gloo.

The model, micro_model.json (`--model FILE.json`), is the tiny preset at half its width:
what the tests prove (exact resume, world-size moves, lineage) does not depend on the width,
and with o200k's 200k-row embedding the width sets most of a step's and a checkpoint's cost
(an 8-step run: 13 instead of 17 CPU-s, measured). Narrower, it learns more slowly: LR is
twice the tiny preset's test rate, so 8 steps still lower the loss by more than one nat.

    reference   `python -m blues_train.training.train`, one rank, 8 steps, checkpoints at 4 and 8
                (reference_run: its folder and its output)
    two_ranks   the same under `deepspeed --num_gpus 2` (two CPU ranks, same global batch)
The fixtures are registered in conftest.py; each is built once per test run, also under
pytest-xdist (built_once.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from built_once import built_once

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = 8
MODEL = str(Path(__file__).with_name("micro_model.json"))
LR = 4e-2
TRAIN_ARGS = ["--model", MODEL, "--max_steps", str(STEPS), "--seq_len", "32", "--global_batch_tokens", "128",
              "--micro_batch", "1", "--lr", str(LR), "--eval_interval", "4", "--eval_sequences", "4",
              "--save_interval", "4", "--keep_last", "2"]
PARITY_RTOL = 1e-4


@pytest.fixture(scope="session")
def mixture_dir(code_store, prose_store, tmp_path_factory):
    from blues_train.mixture.merge import merge

    def build(out):
        merge([code_store, prose_store], out, val_fraction=0.05)

    return built_once(tmp_path_factory, "mixture", build)[0]


def env(ranks: int = 1) -> dict:
    """The environment of a command a test starts: its ranks share this process's threads
    (conftest.py sets them)."""
    threads = max(1, int(os.environ.get("OMP_NUM_THREADS", "1")) // ranks)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def one_rank(mixture, out, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "blues_train.training.train", "--data_cache_dir", str(mixture), "--out", str(out),
           *TRAIN_ARGS, *extra]
    return checked(subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300))


def two_ranks(mixture, out, *extra) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", free_port(), "--module",
           "blues_train.training.train", "--data_cache_dir", str(mixture), "--out", str(out), *TRAIN_ARGS, *extra]
    return checked(subprocess.run(cmd, cwd=ROOT, env=env(ranks=2), capture_output=True, text=True, timeout=300))


def checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def records(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out)}


def assert_close(got: dict, want: dict, steps) -> None:
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=PARITY_RTOL), f"step {step}: {got[step]} vs {want[step]}"


@pytest.fixture(scope="session")
def reference_run(mixture_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    def build(out):
        result = one_rank(mixture_dir, out)
        return {"args": result.args, "stdout": result.stdout, "stderr": result.stderr}

    out, run = built_once(tmp_path_factory, "reference", build)
    return out, subprocess.CompletedProcess(run["args"], 0, run["stdout"], run["stderr"])


@pytest.fixture(scope="session")
def reference(reference_run):
    return reference_run[0]


@pytest.fixture(scope="session")
def two_rank_run(mixture_dir, tmp_path_factory):
    def build(out):
        result = two_ranks(mixture_dir, out)
        return {"args": result.args, "stdout": result.stdout, "stderr": result.stderr}

    out, run = built_once(tmp_path_factory, "two_ranks", build)
    return out, subprocess.CompletedProcess(run["args"], 0, run["stdout"], run["stderr"])
