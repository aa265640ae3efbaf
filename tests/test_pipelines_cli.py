"""`dagster asset materialize -m pipelines.definitions` from a fresh DAGSTER_HOME."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from blues_project import write_project
from blues_train.mixture import read_mixture
from blues_train.prepare import prepare_dataset
from pipelines.config import load_project_config

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_materialize_merged_dataset_from_the_command_line(tmp_path):
    config = load_project_config(write_project(tmp_path, corpus_mb=0.05))
    for source in config.datasets:
        prepare_dataset([source.input], source.token_store, glob=source.glob, progress=False)
    home = tmp_path / "fresh_dagster_home"
    home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home), "BLUES_CONFIG": str(config.path)}
    done = subprocess.run(
        [str(Path(sys.executable).with_name("dagster")), "asset", "materialize",
         "-m", "pipelines.definitions", "--select", "merged_dataset"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ASSET_CHECK_EVALUATION" in done.stderr and "mixture_integrity" in done.stderr
    assert read_mixture(config.mixture.output)["total_tokens"] > 0
