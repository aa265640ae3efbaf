"""Start `dagster dev` on loopback for a test, and stop it by its process id."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from pipelines.home import ensure_dagster_home

REPO = Path(__file__).resolve().parent.parent
DAGSTER = Path(sys.executable).with_name("dagster")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["data"]


ACTIVE_RUNS = """{ runsOrError(filter: {statuses: [QUEUED, NOT_STARTED, STARTING, STARTED]}) {
  ... on Runs { results { runId } } } }"""


def wait_for_runs(port: int, timeout: float = 90) -> None:
    """Until no run is queued or in progress (the sensor launches tokenization runs)."""
    deadline = time.monotonic() + timeout
    while graphql(port, ACTIVE_RUNS)["runsOrError"]["results"]:
        assert time.monotonic() < deadline, "runs still in progress"
        time.sleep(1)


def _default_signals() -> None:
    # A background job of a non-interactive shell ignores SIGINT, and dagster dev turns
    # SIGTERM into SIGINT: without this it would not stop.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def dagster_dev(workdir: Path, config_path: Path, timeout: float = 120):
    """`dagster dev -w workspace.yaml` with a fresh DAGSTER_HOME; yields the port once the
    code location serves its assets. On exit, once no run is in progress: SIGTERM to the
    process, which must take its webserver, daemon and code server down with it."""
    home = ensure_dagster_home(workdir / "dagster_home")
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "BLUES_CONFIG": str(config_path)}
    log_path = workdir / "dagster_dev.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(DAGSTER), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_default_signals,
        )
    try:
        wait_until_serving(process, port, log_path, timeout)
        yield port
        wait_for_runs(port)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
            deadline = time.monotonic() + 30
            while _group_alive(process.pid) and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            leftover = _group_alive(process.pid)
            if leftover:
                os.killpg(process.pid, signal.SIGKILL)
    assert not leftover, f"dagster dev left processes behind:\n{log_path.read_text()[-3000:]}"


def wait_until_serving(process, port: int, log_path, timeout: float, interval: float = 1.0) -> None:
    """Until the dagster dev `process` on `port` serves the asset graph (its log on failure)."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"dagster dev exited:\n{log_path.read_text()[-3000:]}"
        try:
            if graphql(port, "{ assetNodes { id } }")["assetNodes"]:
                return
        except (OSError, KeyError, TypeError):
            pass
        assert time.monotonic() < deadline, f"dagster dev not ready:\n{log_path.read_text()[-3000:]}"
        time.sleep(interval)
