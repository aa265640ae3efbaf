"""Smoke test of the UI server: `dagster dev` on loopback from the repository root, launch
`merged_dataset` through GraphQL, wait for success (and for the tokenization runs that
declarative automation launches), stop the server by its process id. And `make dev`'s launcher stops on SIGTERM and
SIGINT when started the way a script's background job is (SIGINT ignored)."""

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil  # installed with deepspeed
import pytest
from blues_project import write_project
from dagster_graphql import DagsterGraphQLClient
from dagster_server import REPO, dagster_dev, free_port, graphql, wait_for_runs, wait_until_serving

from blues_train.data.prepare import prepare_dataset
from blues_train.mixture.spec import read_mixture
from pipelines.config import load_project_config
from pipelines.home import ensure_dagster_home

SENSOR_RUNS = """{ runsOrError(filter: {tags: [{key: "dagster/sensor_name", value: "tokenize_on_raw_corpus"}]}) {
  ... on Runs { results { status assetSelection { path } } } } }"""


@pytest.mark.slow
def test_dagster_dev_materializes_merged_dataset(tmp_path):
    config = load_project_config(write_project(tmp_path, corpus_mb=0.05))
    for source in config.datasets:
        prepare_dataset([source.input], source.token_store, glob=source.glob, progress=False)

    with dagster_dev(tmp_path, config.path) as port:
        client = DagsterGraphQLClient("127.0.0.1", port_number=port)
        run_id = client.submit_job_execution("__ASSET_JOB", asset_selection=["merged_dataset"])
        deadline = time.monotonic() + 120
        while (status := client.get_run_status(run_id).value) not in ("SUCCESS", "FAILURE", "CANCELED"):
            assert time.monotonic() < deadline, f"run {run_id} still {status}"
            time.sleep(1)
        assert status == "SUCCESS"

        # The automation sensor runs by default: the tokenized datasets are missing from this
        # instance (their stores were written outside it), so it requests both, in one run or two.
        def tokenized():
            runs = graphql(port, SENSOR_RUNS)["runsOrError"]["results"]
            return sorted({"/".join(key["path"]) for r in runs for key in r["assetSelection"]})

        while tokenized() != ["tokenized_dataset/code", "tokenized_dataset/prose"]:
            assert time.monotonic() < deadline, f"automation requested {tokenized()}"
            time.sleep(1)
        wait_for_runs(port)
        runs = graphql(port, SENSOR_RUNS)["runsOrError"]["results"]
        assert {r["status"] for r in runs} == {"SUCCESS"}
    assert read_mixture(config.mixture.output)["strategy"] == "weighted"


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    left = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                left.append(process)
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_make_dev_stops_on_signal_as_a_background_job(tmp_path, sig):
    # Empty raw corpus folders, so the sensor launches no run; the code location loads all the same.
    config_path = write_project(tmp_path, corpus_mb=0.01)
    shutil.rmtree(tmp_path / "corpus")
    for name in ("code", "prose"):
        (tmp_path / "corpus" / name).mkdir(parents=True)
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(ensure_dagster_home(tmp_path / "home")),
           "BLUES_CONFIG": str(config_path)}
    log_path = tmp_path / "dev.log"
    with open(log_path, "w") as log:
        # What the Makefile's dev target runs, as `make dev &` in a script starts it.
        process = subprocess.Popen(
            [sys.executable, "-m", "pipelines.dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
    tree = []
    try:
        wait_until_serving(process, port, log_path, timeout=60, interval=0.5)
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        commands = " ".join(" ".join(p.cmdline()) for p in tree)
        assert all(name in commands for name in ("dagster_webserver", "dagster._daemon", "code-server")), commands

        process.send_signal(sig)
        deadline = time.monotonic() + 30
        while alive(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [" ".join(p.cmdline()) for p in alive(tree)]
        assert not left, f"still running 30 s after {sig.name}: {left}"
        log_text = log_path.read_text()
        assert "SupersessionWarning" not in log_text  # nobody can act on it under `make dev`
        assert f"the UI at http://127.0.0.1:{port} " in log_text
        assert " - INFO - " not in log_text, log_text[-2000:]  # no line per daemon tick
    finally:
        for leftover in alive(tree):
            leftover.kill()
        if process.poll() is None:
            process.kill()
        process.wait()
