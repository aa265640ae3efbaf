"""The README's quick tour runs as written: every command of its "Command line" block, in
order, in a fresh folder, then its Python example."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def readme_block(heading: str, language: str = "") -> str:
    """The first fenced block (of `language`) after `heading` in the README."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    return re.search(rf"```{language}\n(.*?)```", section, re.DOTALL).group(1)


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, trailing `# comments` dropped."""
    joined = block.replace("\\\n", " ")
    return [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines() if line.strip()]


def test_readme_command_line_tour_runs_as_written(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "2"}
    tour = commands(readme_block("## Command line"))
    assert [c.split()[1] for c in tour][:3] == ["sample-corpus", "prepare", "prepare"]
    for command in tour:
        result = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        assert "Traceback" not in result.stderr, command
    assert "perplexity: " in result.stdout

    example = readme_block("### `blues generate`", "python")
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("def main(")


def test_train_defaults_follow_the_model(tmp_path):
    """`blues train --data_cache_dir M --model tiny` with no --seq_len: the tiny model's 256,
    not the 1024 default of the larger model."""
    from blues_train.merge import merge
    from blues_train.prepare import prepare_dataset
    from blues_train.sample_corpus import write_sample_corpus

    corpus = write_sample_corpus(tmp_path / "corpus", max_mb=0.3)
    prepare_dataset(corpus["code"], tmp_path / "code", workers=1, progress=False)
    merge([tmp_path / "code"], tmp_path / "mixture")
    cmd = [str(BIN / "blues"), "train", "--data_cache_dir", str(tmp_path / "mixture"), "--model", "tiny",
           "--out", str(tmp_path / "run"), "--max_steps", "1", "--global_batch_tokens", "512",
           "--eval_sequences", "2"]
    result = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "2"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "x seq_len 256 = 512 tokens per step" in result.stdout
