"""`blues generate` on a checkpoint saved by a short real training run (tiny model, CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blues_train.errors import BluesError
from blues_train.generate import evaluate_perplexity, load_model, sample_text

ROOT = Path(__file__).resolve().parents[1]
BLUES = str(Path(sys.executable).parent / "blues")


@pytest.fixture(scope="module")
def run_dir(code_store, prose_store, tmp_path_factory):
    from blues_train.mixture import merge

    mixture = tmp_path_factory.mktemp("gen_mixture")
    merge([code_store, prose_store], mixture, val_fraction=0.05)
    out = tmp_path_factory.mktemp("gen_run")
    cmd = [sys.executable, "-m", "blues_train.train", "--data_cache_dir", str(mixture), "--out", str(out),
           "--model", "tiny", "--max_steps", "2", "--seq_len", "32", "--global_batch_tokens", "128",
           "--eval_sequences", "2", "--lr", "1e-2"]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def blues(*args) -> subprocess.CompletedProcess:
    return subprocess.run([BLUES, "generate", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_greedy_output_repeats(run_dir):
    model = load_model(run_dir, device="cpu")
    first = sample_text(model, prompt="def main(", max_length=8, temperature=0)
    assert first.startswith("def main(") and len(first) > len("def main(")
    assert sample_text(model, prompt="def main(", max_length=8, temperature=0) == first
    sampled = [sample_text(model, prompt="The", max_length=6, temperature=1.0, top_p=0.9, top_k=20, seed=3)
               for _ in range(2)]
    assert sampled[0] == sampled[1]

    cli = [blues("--checkpoint", str(run_dir), "--prompt", "def main(", "--max_length", "8", "--temperature", "0")
           for _ in range(2)]
    assert cli[0].returncode == 0, cli[0].stderr
    assert cli[0].stdout == cli[1].stdout == first + "\n"


def test_eval_text_prints_perplexity(run_dir, tmp_path):
    text = "The quick brown fox jumps over the lazy dog."
    result = blues("--checkpoint", str(run_dir / "checkpoints" / "step-000002"), "--eval_text", text)
    assert result.returncode == 0, result.stderr
    value = float(result.stdout.strip().removeprefix("perplexity: "))
    assert value == pytest.approx(evaluate_perplexity(load_model(run_dir, device="cpu"), text), rel=1e-4)
    (tmp_path / "t.txt").write_text(text)
    assert blues("--checkpoint", str(run_dir), "--eval_file", str(tmp_path / "t.txt")).stdout == result.stdout


def broken_copies(run_dir, tmp_path) -> dict[str, Path]:
    good = run_dir / "checkpoints" / "step-000002"
    cases = {}
    for name in ("missing", "corrupt", "mismatch"):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(good / "config.json", folder)
        shutil.copy(good / "model.safetensors", folder)
        cases[name] = folder
    (cases["missing"] / "model.safetensors").unlink()
    data = (cases["corrupt"] / "model.safetensors").read_bytes()
    (cases["corrupt"] / "model.safetensors").write_bytes(data[: len(data) // 3])
    config = json.loads((good / "config.json").read_text())
    (cases["mismatch"] / "config.json").write_text(json.dumps({**config, "n_experts": 8}))
    return cases


@pytest.mark.parametrize("case, message", [
    ("missing", "model.safetensors: missing"),
    ("corrupt", "corrupt or not a safetensors file"),
    ("mismatch", "another model config"),
    ("nowhere", "no such folder"),
])
def test_bad_checkpoints_give_clear_errors(run_dir, tmp_path, case, message):
    folder = broken_copies(run_dir, tmp_path).get(case, tmp_path / "nowhere")
    with pytest.raises(BluesError, match=message):
        load_model(folder, device="cpu")
    result = blues("--checkpoint", str(folder), "--prompt", "x")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
