"""`blues train --tracking mlflow` against a real MLflow tracking server whose backend store
is the real PostgreSQL server (a database of its own, dropped afterwards): a short run, then
its resume, read back through MLflow's client and compared with metrics.jsonl; `blues eval`
of its checkpoint logging into the same run; a run that crashes, then is killed, then
finishes, all one MLflow run. Skipped when no PostgreSQL is reachable, unless
$BLUES_REQUIRE_POSTGRES is set."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("mlflow", reason="needs the tracking extra: pip install 'blues[tracking]'")

from test_postgres_instance import PG_HOST, PG_PORT, PG_USER, fresh_database  # noqa: E402
from training_runs import ROOT, TRAIN_ARGS, env, free_port, one_rank, records  # noqa: E402

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def mlflow_database():
    with fresh_database("blues_mlflow") as name:
        yield name


@pytest.fixture(scope="module")
def mlflow_server(mlflow_database, tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with the PostgreSQL database as its backend store: its URI.
    Without the server's job execution (MLflow's GenAI jobs, unused by tracking): its seven
    job-runner processes would take a core for half a minute at start."""
    artifacts = tmp_path_factory.mktemp("mlflow_artifacts")
    port = free_port()
    log = open(artifacts.parent / "mlflow_server.log", "w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri",
         f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{mlflow_database}",
         "--default-artifact-root", artifacts.as_uri(), "--host", "127.0.0.1", "--port", port, "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(uri, server, artifacts.parent / "mlflow_server.log")
        yield uri
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
        server.wait(timeout=60)
        log.close()


def wait_until_healthy(uri: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"mlflow server exited: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"mlflow server did not answer within {timeout} s: {log.read_text()[-3000:]}")


def tracking_env(uri: str) -> dict:
    return {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "blues-test"}


@pytest.fixture(scope="module")
def tracked_run(mlflow_server, mixture_dir, tmp_path_factory):
    """4 steps tracked, then a resume to step 8 (--max_steps changed) continuing the MLflow run."""
    out = tmp_path_factory.mktemp("tracked")
    saved = {k: os.environ.get(k) for k in tracking_env(mlflow_server)}
    os.environ.update(tracking_env(mlflow_server))
    try:
        one_rank(mixture_dir, out, "--tracking", "mlflow", "--max_steps", "4")
        first_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
        one_rank(mixture_dir, out, "--tracking", "mlflow", "--resume", "auto")
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.update({key: value})
    return out, first_id


def test_resumed_run_continues_the_same_mlflow_run(tracked_run, mlflow_server, mixture_dir):
    from mlflow import MlflowClient

    out, first_id = tracked_run
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == first_id
    client = MlflowClient(mlflow_server)
    run = client.get_run(first_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "blues-test"

    settings = json.loads((out / "checkpoints" / "step-000008" / "meta.json").read_text())
    assert run.data.params["seq_len"] == "32" and run.data.params["tracking"] == "mlflow"
    assert run.data.params["max_steps"] == "4"  # MLflow parameters cannot change: the resume's is a tag
    assert run.data.tags["resumed_at.step-4.max_steps"] == "8"
    assert run.data.params["resume"] == "None" and run.data.tags["resumed_at.step-4.resume"] == "auto"

    mixture = json.loads((mixture_dir / "mixture.json").read_text())
    assert run.data.tags["blues.mixture_fingerprint"] == mixture["fingerprint"] == settings["mixture"]["fingerprint"]
    for i, source in enumerate(mixture["sources"]):
        assert run.data.tags[f"blues.store.{i}.fingerprint"] == source["fingerprint"]
    for step in (4, 8):
        folder = out / "checkpoints" / f"step-{step:06d}"
        meta = json.loads((folder / "meta.json").read_text())
        assert run.data.tags[f"checkpoint.{folder.name}.path"] == str(folder.resolve())
        assert run.data.tags[f"checkpoint.{folder.name}.sha256"] == meta["files"]["model.safetensors"]


def test_every_step_metric_is_metrics_jsonl(tracked_run, mlflow_server):
    from mlflow import MlflowClient

    out, run_id = tracked_run
    client = MlflowClient(mlflow_server)
    jsonl = {r["step"]: r for r in records(out)}
    assert sorted(jsonl) == list(range(1, 9))
    layer = jsonl[1]["experts"][0]["layer"]
    figures = {key: lambda r, key=key: r[key] for key in ("loss", "lr", "grad_norm", "tokens_per_s", "aux_loss")}
    figures[f"experts/layer{layer}/max_load"] = lambda r: r["experts"][0]["max_load"]
    for key, figure in figures.items():
        history = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert sorted(history) == list(range(1, 9)), key
        for step, value in history.items():
            assert value == pytest.approx(figure(jsonl[step]), rel=1e-9), (key, step)
    val = {m.step: m.value for m in client.get_metric_history(run_id, "val_loss")}
    assert val == {4: pytest.approx(jsonl[4]["val_loss"]), 8: pytest.approx(jsonl[8]["val_loss"])}


def test_eval_scores_are_logged_into_the_checkpoints_run(tracked_run, mlflow_server, mixture_dir, tmp_path):
    pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'blues[eval]'")
    from mlflow import MlflowClient

    from blues_train import cli

    out, run_id = tracked_run
    tasks = tmp_path / "tasks"
    assert cli.main(["eval-tasks", "--mixture", str(mixture_dir), "--out", str(tasks)]) == 0
    step4 = out / "checkpoints" / "step-000004"
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    try:  # MLFLOW_TRACKING_URI is not set: the run file says where the run is
        assert cli.main(["eval", "--checkpoint", str(step4), "--tasks", "blues_cloze,blues_next_passage",
                         "--include_path", str(tasks), "--limit", "6"]) == 0
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.update({key: value})
    [written] = (out / "checkpoints" / "step-000004.lm_eval").glob("results-*.json")
    results = json.loads(written.read_text())["results"]
    client = MlflowClient(mlflow_server)
    logged = {key: client.get_metric_history(run_id, key) for key in client.get_run(run_id).data.metrics
              if key.startswith("lm_eval/")}
    want = {f"lm_eval/{task}/{key.split(',')[0]}": value for task, scores in results.items()
            for key, value in scores.items() if key != "alias" and isinstance(value, (int, float))}
    assert {"lm_eval/blues_cloze/acc", "lm_eval/blues_next_passage/acc"} <= set(want)
    assert sorted(logged) == sorted(want)
    for key, history in logged.items():
        assert [(m.step, m.value) for m in history] == [(4, pytest.approx(want[key], rel=1e-12))], key


def start_training(mixture, out, extra_env: dict, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "blues_train.training.train", "--data_cache_dir", str(mixture), "--out", str(out),
           *TRAIN_ARGS, "--tracking", "mlflow", "--save_interval", "2", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env={**env(2), **extra_env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def saved_steps(out: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*/meta.json"))


def wait_for_checkpoint_after(proc: subprocess.Popen, out: Path, step: int) -> None:
    deadline = time.monotonic() + 240
    while not [s for s in saved_steps(out) if s > step]:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)


def test_a_crashed_then_killed_run_ends_so_and_its_resume_continues_it(mlflow_server, mixture_dir, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    out, dumps = tmp_path / "run", tmp_path / "dumps"
    dumps.mkdir()
    # a real exception in the step loop: the window dump's folder is removed once a checkpoint is saved
    proc = start_training(mixture_dir, out, {**tracking_env(mlflow_server), "BLUES_WINDOW_DUMP": str(dumps / "w")},
                          "--max_steps", "400")
    wait_for_checkpoint_after(proc, out, 0)
    shutil.rmtree(dumps)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2 and "error:" in output and "Traceback" not in output, output[-3000:]
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "FAILED"

    # its resume is the same MLflow run, RUNNING again; SIGTERM ends it KILLED
    crashed_at = saved_steps(out)[-1]
    proc = start_training(mixture_dir, out, tracking_env(mlflow_server), "--resume", "auto", "--max_steps", "400")
    wait_for_checkpoint_after(proc, out, crashed_at)
    assert client.get_run(run_id).info.status == "RUNNING"
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in output, output[-3000:]
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == run_id
    assert client.get_run(run_id).info.status == "KILLED"

    # resumed to the end: still the same run, FINISHED, every step of metrics.jsonl in it
    last = saved_steps(out)[-1] + 2
    saved = {k: os.environ.get(k) for k in tracking_env(mlflow_server)}
    os.environ.update(tracking_env(mlflow_server))
    try:
        one_rank(mixture_dir, out, "--tracking", "mlflow", "--save_interval", "2", "--resume", "auto",
                 "--max_steps", str(last))
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.update({key: value})
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    jsonl = {r["step"]: r["loss"] for r in records(out)}
    assert sorted(jsonl) == list(range(1, last + 1))
    history = {}
    for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.timestamp):
        history[m.step] = m.value  # a step logged before a crash and again after its resume: the resume's
    assert set(jsonl) <= set(history)
    for step, loss in jsonl.items():
        assert history[step] == pytest.approx(loss, rel=1e-9), step


def test_without_tracking_nothing_is_sent(reference):
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert not (reference / "mlflow_run.json").exists()
    assert not (Path.cwd() / "mlruns").exists()
