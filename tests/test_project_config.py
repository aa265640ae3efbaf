"""The project configuration is validated by its schema: a misspelled key anywhere is an
error naming it and the nearest valid key; missing inputs and model files are reported when
the file loads; in Dagster such an error is that one line. Importing the code location
reads no configuration."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from blues_project import write_project

from blues_train.io.errors import BluesError
from blues_train.training.config import TrainingConfig
from pipelines import definitions
from pipelines.config import parse_project_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return write_project(tmp_path_factory.mktemp("project"), corpus_mb=0.02)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["training"].update(max_step=5), "training.max_step is not a known setting; did you mean max_steps?"),
    (lambda c: c["sources"][0].update(formatt="text"), "sources[0].formatt is not a known setting; did you mean format?"),
    (lambda c: c.update(trainig={}), "trainig is not a known setting; did you mean training?"),
    (lambda c: c["training"].update(model="missing.json"), "training.model"),
    (lambda c: c["sources"][0].update(input="nowhere"), "sources[0].input"),
    (lambda c: c["training"].update(max_steps="60"), "training.max_steps: input should be a valid integer"),
])
def test_errors_name_the_key(project, edit, message):
    raw = json.loads(project.read_text())
    edit(raw)
    with pytest.raises(BluesError) as raised:
        parse_project_config(raw, project)
    assert str(raised.value).startswith(f"{project}: ")
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_training_section_builds_the_training_config(project):
    config = parse_project_config(json.loads(project.read_text()), project)
    run = config.training.run_config(config.mixture.output, project.parent / "runs" / "run-1")
    assert isinstance(run, TrainingConfig)
    assert (run.max_steps, run.seq_len, run.eval_sequences) == (2, 64, 4)  # blues_project's TRAINING, args too
    assert run.keep_last == TrainingConfig().keep_last  # a default not in the file: the one of blues train
    assert run.data_cache_dir == str(config.mixture.output)


def test_bad_configuration_is_one_line_in_dagster(project, tmp_path, monkeypatch):
    raw = json.loads(project.read_text())
    raw["training"]["max_step"] = 5
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps(raw))
    monkeypatch.setenv("BLUES_CONFIG", str(bad))
    with pytest.raises(dg.Failure) as raised:
        definitions.defs()
    assert raised.value.description == (f"{bad}: training.max_step is not a known setting; "
                                        "did you mean max_steps?")


def test_importing_the_code_location_reads_no_configuration(tmp_path):
    env = {**os.environ, "BLUES_CONFIG": str(tmp_path / "absent.json")}
    code = "import pipelines.definitions, pipelines.assets, pipelines.checks, pipelines.sensors"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
