"""The issue's command, `dagster asset materialize -m pipelines.definitions --select
'*merged_dataset'`, from a fresh DAGSTER_HOME: tokenizes every dataset, checks the token
stores and merges them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from blues_project import write_project

from blues_train.mixture.spec import read_mixture
from pipelines.config import load_project_config

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_materialize_merged_dataset_and_upstream_from_the_command_line(tmp_path):
    config = load_project_config(write_project(tmp_path, corpus_mb=0.05))
    home = tmp_path / "fresh_dagster_home"
    home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home), "BLUES_CONFIG": str(config.path)}
    done = subprocess.run(
        [str(Path(sys.executable).with_name("dagster")), "asset", "materialize",
         "-m", "pipelines.definitions", "--select", "*merged_dataset"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for check in ("'token_store_integrity' on 'tokenized_dataset/code' passed",
                  "'token_store_integrity' on 'tokenized_dataset/prose' passed",
                  "'mixture_integrity' on 'merged_dataset' passed"):
        assert check in done.stderr
    assert read_mixture(config.mixture.output)["total_tokens"] > 0
