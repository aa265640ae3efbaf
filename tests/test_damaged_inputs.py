"""Inputs a user may hand us damaged or in an unexpected shape: each is read as it should
be, or refused in one line naming the file and what to do.

    Parquet text columns dictionary-encoded (pandas `category`) or large_string
    a --deepspeed config asking for fp16 on a machine without a GPU
    a project config.json with a mistake, loaded by `dagster asset list`
    a run's metrics.jsonl with a damaged line (`blues lineage`)
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from blues_project import write_project
from training_runs import BIN, ROOT, TRAIN_ARGS, env

from blues_train.data.prepare import prepare_dataset
from blues_train.data.store import read_manifest
from blues_train.io.command_line import run_command
from blues_train.serving import lineage
from blues_train.training.config import DEFAULT_DS_CONFIG

TOPICS_ROWS = 40  # of the sample corpus' prose/topics.parquet: enough rows for a few documents of each kind


def store_rows(folder) -> list[dict]:
    """Every row (tokens, source, index) of a token store, in chunk order."""
    rows = []
    for chunk in read_manifest(folder)["chunks"]:
        with pa.memory_map(str(folder / chunk["file"])) as f:
            rows += pa.ipc.open_file(f).read_all().to_pylist()
    return rows


def text_column(kind: str, texts: pa.Array) -> pa.Array:
    if kind == "string":
        return texts
    large = texts.cast(pa.large_string())
    return {"large_string": large, "dictionary<string>": texts.dictionary_encode(),
            "dictionary<large_string>": large.dictionary_encode()}[kind]


@pytest.mark.parametrize("kind", ["large_string", "dictionary<string>", "dictionary<large_string>"])
def test_parquet_text_in_any_string_encoding_makes_the_same_store(sample_corpus_dir, tmp_path, kind):
    texts = pq.read_table(sample_corpus_dir / "prose" / "topics.parquet").column("text").combine_chunks()
    texts = pa.concat_arrays([texts[:TOPICS_ROWS], pa.array([texts[0].as_py(), None], pa.string())])
    stores = {}
    for name in ("string", kind):
        column = text_column(name, texts)
        (tmp_path / name).mkdir()
        pq.write_table(pa.table({"text": column}), tmp_path / name / "topics.parquet")
        written = pq.read_schema(tmp_path / name / "topics.parquet").field("text").type
        assert pa.types.is_dictionary(written) == name.startswith("dictionary")  # Parquet reads large_ back as plain
        stores[name] = tmp_path / "stores" / name
        prepare_dataset([tmp_path / name / "topics.parquet"], stores[name], workers=1, progress=False)
    assert store_rows(stores[kind]) == store_rows(stores["string"])
    assert len(store_rows(stores["string"])) == TOPICS_ROWS + 1  # the repeated text too; the null is empty


def test_fp16_deepspeed_config_on_a_cpu_is_one_line(mixture_dir, tmp_path):
    ds_config = json.loads(DEFAULT_DS_CONFIG.read_text())
    ds_config["fp16"] = {"enabled": True}
    config = tmp_path / "ds_fp16.json"
    config.write_text(json.dumps(ds_config))
    result = subprocess.run([str(BIN / "blues"), "train", "--data_cache_dir", str(mixture_dir), "--out",
                             str(tmp_path / "run"), *TRAIN_ARGS, "--deepspeed", str(config)],
                            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [f"error: --deepspeed {config}: fp16 needs a GPU and this machine has "
                                          "none; remove the \"fp16\" section (or set \"enabled\": false)"]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_project_config_is_the_first_line_dagster_prints(tmp_path):
    config = write_project(tmp_path, corpus_mb=0.02)
    raw = json.loads(config.read_text())
    raw["training"]["max_step"] = raw["training"].pop("max_steps")
    config.write_text(json.dumps(raw))
    result = subprocess.run([str(BIN / "dagster"), "asset", "list", "-m", "pipelines.definitions"], cwd=tmp_path,
                            env={**env(), "BLUES_CONFIG": str(config), "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.splitlines()[0] == (f"error: {config}: training.max_step is not a known setting; "
                                             "did you mean max_steps?"), result.stderr[-3000:]


def damaged_run(reference, tmp_path, step: int, damage) -> Path:
    """A copy of the reference run (its metrics, not its checkpoints) whose metrics.jsonl line
    of `step` is `damage(line)`."""
    run = tmp_path / "run"
    shutil.copytree(reference, run, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    lines = (run / "metrics.jsonl").read_bytes().split(b"\n")
    lines[step - 1] = damage(lines[step - 1])
    (run / "metrics.jsonl").write_bytes(b"\n".join(lines))
    return run


def with_windows(windows):
    return lambda line: json.dumps({**json.loads(line), "windows": windows}).encode()


def lineage_command(run, *argv, capsys=None) -> tuple[int, str]:
    """`blues lineage --run run *argv`: its exit code and stderr, from the console script, or
    in this process (the same main and error handling, without the interpreter's start) when
    capsys is given."""
    if capsys is None:
        result = subprocess.run([str(BIN / "blues"), "lineage", "--run", str(run), *argv], cwd=ROOT, env=env(),
                                capture_output=True, text=True, timeout=120)
        return result.returncode, result.stderr
    capsys.readouterr()
    code = run_command(lineage.main, ["--run", str(run), *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("damage, problem", [
    (lambda line: line[:20] + b"\xff" + line[21:], "not a JSON record"),
    (with_windows("nope"), "windows: input should be a valid list (got 'nope')"),
    (with_windows([0, 99999999999]), "windows [0, 99999999999] are not [16, 20), the 4 windows its layout deals"),
    (with_windows([16, 20, 24]), "windows: list should have at most 2 items"),
])
def test_damaged_metrics_line_is_refused_with_its_file_and_line(reference, tmp_path, capsys, damage, problem):
    run = damaged_run(reference, tmp_path, 5, damage)
    # The first query through the console script, the others in this process.
    queries = (["--step", "5"], ["--step", "2"], ["--document", "stdlib.jsonl.zst:0"], ["--spikes"])
    for i, argv in enumerate(queries):
        code, stderr = lineage_command(run, *argv, capsys=capsys if i else None)
        assert code == 2, stderr[-3000:]
        error = stderr.splitlines()
        assert len(error) == 1 and error[0].startswith(f"error: {run / 'metrics.jsonl'}:5: "), error
        assert problem in error[0]


def test_torn_last_metrics_line_is_skipped(reference, tmp_path, capsys):
    run = damaged_run(reference, tmp_path, 8, lambda line: line[:30] + b"\xff")
    code, stderr = lineage_command(run, "--step", "8")
    assert code == 2 and "records steps 1-7" in stderr, stderr[-3000:]
    assert lineage_command(run, "--step", "7", capsys=capsys)[0] == 0
