"""`blues generate` on the checkpoints of a short real training run (tiny model, CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blues_train.io.errors import BluesError
from blues_train.serving.generate import evaluate_perplexity, load_model, sample_text

ROOT = Path(__file__).resolve().parents[1]
BLUES = str(Path(sys.executable).parent / "blues")


@pytest.fixture(scope="module")
def run_dir(reference):
    """The shared reference run (tests/training_runs.py): checkpoints at steps 4 and 8."""
    return reference


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
    result = blues("--checkpoint", str(run_dir / "checkpoints" / "step-000008"), "--eval_text", text)
    assert result.returncode == 0, result.stderr
    value = float(result.stdout.strip().removeprefix("perplexity: "))
    assert value == pytest.approx(evaluate_perplexity(load_model(run_dir, device="cpu"), text), rel=1e-4)
    (tmp_path / "t.txt").write_text(text)
    assert blues("--checkpoint", str(run_dir), "--eval_file", str(tmp_path / "t.txt")).stdout == result.stdout


def broken_copies(run_dir, tmp_path) -> dict[str, Path]:
    good = run_dir / "checkpoints" / "step-000008"
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


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint folder as checkpoint.save writes it (model.safetensors, config.json) of an
    untrained tiny model: no training needed."""
    import torch
    from safetensors.torch import save_file

    from blues_model import BluesConfig, BluesLM

    folder = tmp_path_factory.mktemp("tiny_checkpoint")
    config = BluesConfig.preset("tiny")
    torch.manual_seed(0)
    save_file(BluesLM(config).state_dict(), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return folder


def cli_generate(capsys, *args) -> tuple[int, str]:
    from blues_train.cli import main

    code = main(["generate", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "nan", "--temperature must be a finite number >= 0 (0 = greedy), got nan"),
    ("--temperature", "inf", "--temperature must be a finite number >= 0 (0 = greedy), got inf"),
    ("--temperature", "-0.5", "--temperature must be a finite number >= 0 (0 = greedy), got -0.5"),
    ("--top_p", "nan", "--top_p must be a number in (0, 1] (1 = no top-p cut), got nan"),
    ("--top_p", "1.5", "--top_p must be a number in (0, 1] (1 = no top-p cut), got 1.5"),
    ("--top_k", "-1", "--top_k must be an integer >= 0 (0 = no top-k cut), got -1"),
    ("--max_length", "0", "--max_length must be an integer >= 1, got 0"),
])
def test_bad_sampling_flags_are_refused(tiny_checkpoint, capsys, flag, value, message):
    code, err = cli_generate(capsys, "--checkpoint", str(tiny_checkpoint), "--prompt", "x", f"{flag}={value}")
    assert code == 2
    assert err == f"error: {message}\n"


@pytest.mark.parametrize("setting, message", [
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
    ({"top_p": float("nan")}, r"top_p must be a number in \(0, 1\]"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"max_length": 0}, "max_length must be an integer >= 1"),
])
def test_sample_text_refuses_bad_settings(tiny_checkpoint, setting, message):
    model = load_model(tiny_checkpoint, device="cpu")
    with pytest.raises(BluesError, match=message):
        sample_text(model, prompt="x", **{"max_length": 2, **setting})


def tampered(tiny_checkpoint, tmp_path, change) -> Path:
    """A copy of the tiny checkpoint whose tensors went through change(dict of tensors)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tiny_checkpoint / "model.safetensors"))
    change(weights)
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(tiny_checkpoint / "config.json", tmp_path)
    return tmp_path


def set_value(name, value):
    def change(weights):
        weights[name][0] = value
    return change


@pytest.mark.parametrize("change, message", [
    (set_value("blocks.1.ffn.w_down", float("nan")), "blocks.1.ffn.w_down holds NaN"),
    (set_value("norm.weight", float("inf")), "norm.weight holds Inf"),
    (lambda w: w.update({"blocks.0.attn.qkv.weight": w["blocks.0.attn.qkv.weight"].long()}),
     "blocks.0.attn.qkv.weight has dtype I64"),
    (lambda w: w.update({"norm.weight": w["norm.weight"].bool()}), "norm.weight has dtype BOOL"),
    (lambda w: w.pop("blocks.2.ffn_norm.weight"), "missing blocks.2.ffn_norm.weight"),
    (lambda w: w.update({"lm_head.weight": w["embed.weight"].clone()}), "unexpected lm_head.weight"),
])
def test_bad_tensors_are_refused(tiny_checkpoint, tmp_path, capsys, change, message):
    folder = tampered(tiny_checkpoint, tmp_path, change)
    with pytest.raises(BluesError, match=message) as raised:
        load_model(folder, device="cpu")
    assert str(folder / "model.safetensors") in str(raised.value)
    code, err = cli_generate(capsys, "--checkpoint", str(folder), "--prompt", "x")
    assert code == 2 and err.count("\n") == 1 and message in err


LOAD_HUGE = """
import resource, sys, time
from blues_train.io.errors import BluesError
from blues_train.serving.generate import load_model
before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
try:
    load_model(sys.argv[1], device="cpu")
except BluesError as exc:
    print(exc)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, time.monotonic() - start)
"""


def test_config_too_big_for_the_weights_is_refused_before_allocating(tiny_checkpoint, tmp_path):
    # d_model 65536 makes a model of about 60 GB; the header alone shows that the file does
    # not hold it. The address-space limit keeps a regression from eating the machine.
    import resource

    shutil.copy(tiny_checkpoint / "model.safetensors", tmp_path)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "d_model": 65536}))
    limit = 16 << 30
    result = subprocess.run([sys.executable, "-c", LOAD_HUGE, str(tmp_path)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert result.returncode == 0, result.stderr[-3000:]
    message, measured = result.stdout.strip().splitlines()
    assert message.startswith(f"{tmp_path / 'model.safetensors'} does not match the model of "
                              f"{tmp_path / 'config.json'}: shape (file vs config) ")
    assert "blocks.0.attn.qkv.weight [96, 64] vs [98304, 65536]" in message
    rss_growth_mb, seconds = int(measured.split()[0]), float(measured.split()[1])
    assert rss_growth_mb < 100 and seconds < 10, measured


def test_half_precision_weights_load_as_fp32(tiny_checkpoint, tmp_path):
    import torch
    from safetensors.torch import load_file

    folder = tampered(tiny_checkpoint, tmp_path, lambda w: w.update({k: v.bfloat16() for k, v in w.items()}))
    model = load_model(folder, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    expected = load_file(str(folder / "model.safetensors"))["embed.weight"].float()
    assert torch.equal(model.embed.weight, expected)
