"""`blues prepare` and `blues sample-corpus` as a user runs them: separate processes."""

from __future__ import annotations

import json
import subprocess
import sys


def blues(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "blues_train.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_prepare_writes_store_prints_stats_then_is_a_no_op(tmp_path, sample_corpus_dir):
    args = ["prepare", "--input_dir", sample_corpus_dir / "prose", "--glob", "**/*.*",
            "--data_cache_dir", tmp_path / "store", "--workers", "2", "--chunk_tokens", "100000"]
    first = blues(*args)
    assert first.returncode == 0, first.stderr
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert f"tokens {manifest['totals']['tokens']:,}" in first.stdout
    assert "stored" in first.stdout and "p50=" in first.stdout
    assert "tokens/s" in first.stderr  # plain log line: not a terminal
    again = blues(*args)
    assert again.returncode == 0 and "up to date" in again.stdout


def test_prepare_error_is_one_line_without_traceback(tmp_path):
    result = blues("prepare", "--dataset", tmp_path / "missing.csv", "--cache_dir", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "missing.csv" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_sample_corpus_is_deterministic_and_capped(tmp_path):
    for name in ("a", "b"):
        result = blues("sample-corpus", "--out", tmp_path / name, "--max_mb", "0.3")
        assert result.returncode == 0, result.stderr
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert {f.suffix for f in files} >= {".zst", ".csv", ".parquet", ".txt"}
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert sum((tmp_path / "a" / f).stat().st_size for f in files) < 1_000_000
