"""`blues train --tracking mlflow` against a real MLflow tracking server whose backend store
is the real PostgreSQL server (a database of its own, dropped afterwards): a short run, then
its resume, read back through MLflow's client and compared with metrics.jsonl. Skipped when
no PostgreSQL is reachable, unless $BLUES_REQUIRE_POSTGRES is set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("mlflow", reason="needs the tracking extra: pip install 'blues[tracking]'")

from test_postgres_instance import PG_HOST, PG_PORT, PG_USER, fresh_database  # noqa: E402
from training_runs import free_port, one_rank, records  # noqa: E402

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


@pytest.fixture(scope="module")
def tracked_run(mlflow_server, mixture_dir, tmp_path_factory):
    """4 steps tracked, then a resume to step 8 (--max_steps changed) continuing the MLflow run."""
    out = tmp_path_factory.mktemp("tracked")
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": "blues-test"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
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


def test_without_tracking_nothing_is_sent(reference):
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert not (reference / "mlflow_run.json").exists()
    assert not (Path.cwd() / "mlruns").exists()
