"""The production instance, against the real PostgreSQL server (127.0.0.1:5432, trust
authentication, user postgres): `dagster-daemon run` as its own process materializes the
whole graph through the run queue (the sensors tokenize, the retrain schedule merges,
trains and evaluates; their ticks are recorded in PostgreSQL), then `dagster asset
materialize --select merged_dataset` from the command line runs against the same instance.

Each test creates its own database and drops it. Where no PostgreSQL is reachable the test
is skipped with the reason, unless $BLUES_REQUIRE_POSTGRES is set (`.ci/run` sets it): then
it fails."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pytest
from blues_project import write_project
from dagster._core.scheduler.instigation import TickStatus
from dagster_server import REPO, _default_signals, _group_alive

from pipelines.home import POSTGRES_TEMPLATE, ensure_dagster_home

PG_HOST, PG_PORT, PG_USER, PG_ADMIN_DB = "127.0.0.1", 5432, "postgres", "test"
REQUIRE_ENV = "BLUES_REQUIRE_POSTGRES"
BIN = Path(sys.executable).parent
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


def admin_connection():
    """A connection to the server's `test` database, or skip (fail under $BLUES_REQUIRE_POSTGRES)."""
    import psycopg2  # installed with dagster-postgres

    try:
        connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=PG_ADMIN_DB,
                                      connect_timeout=5)
    except psycopg2.OperationalError as exc:
        reason = (f"no PostgreSQL reachable at {PG_HOST}:{PG_PORT} (user {PG_USER}, database "
                  f"{PG_ADMIN_DB}): {str(exc).strip().splitlines()[0]}")
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{reason}; ${REQUIRE_ENV} is set, so this is a failure")
        pytest.skip(reason)
    connection.autocommit = True
    return connection


@contextmanager
def fresh_database(prefix: str):
    """The name of a new, empty database on the server, dropped afterwards."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = admin_connection()
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def database():
    """A fresh database for this test, dropped afterwards."""
    with fresh_database("blues_test") as name:
        yield name


@pytest.fixture
def instance_env(tmp_path, database, monkeypatch):
    """The environment of every process of the instance: DAGSTER_HOME with the PostgreSQL
    template, the DAGSTER_PG_* connection, and a project retrained every minute."""
    project = write_project(tmp_path, corpus_mb=0.05)
    raw = json.loads(project.read_text())
    raw["schedule"]["retrain_cron"] = "* * * * *"
    project.write_text(json.dumps(raw))
    env = {"DAGSTER_HOME": str(ensure_dagster_home(tmp_path / "home", POSTGRES_TEMPLATE)),
           "BLUES_CONFIG": str(project), "DAGSTER_PG_HOST": PG_HOST, "DAGSTER_PG_PORT": str(PG_PORT),
           "DAGSTER_PG_USER": PG_USER, "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_DB": database}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **env}


def dagster(env, *args, timeout=300) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "dagster"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def wait(condition, what: str, timeout: float, log: Path):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} after {timeout:.0f} s; daemon log:\n{log.read_text()[-4000:]}"
        time.sleep(1)
    return value


def materialized(instance, *keys: str) -> bool:
    return all(instance.get_latest_materialization_event(dg.AssetKey.from_user_string(k)) for k in keys)


def runs_done(instance) -> list:
    runs = instance.get_runs()
    return runs if runs and all(run.status.value in TERMINAL for run in runs) else []


def ticks(instance, name: str) -> list:
    """The ticks PostgreSQL holds for the schedule or sensor `name`."""
    states = [s for s in instance.all_instigator_state() if s.instigator_name == name]
    return [t for s in states for t in instance.get_ticks(s.instigator_origin_id, s.selector_id)]


@pytest.mark.slow
def test_whole_graph_on_postgres_with_the_daemon_then_the_cli(tmp_path, instance_env):
    instance = dg.DagsterInstance.get()
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    assert instance.get_concurrency_config().pool_config.default_pool_limit == 1  # the gpu pool

    log = tmp_path / "daemon.log"
    with open(log, "w") as out:
        daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], cwd=REPO,
                                  env=instance_env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True, preexec_fn=_default_signals)
    try:
        # The sensors are on by default: raw_corpus_sensor reports the raw files, the
        # tokenize_on_raw_corpus automation tokenizes both datasets (queued runs the daemon launches).
        wait(lambda: materialized(instance, "tokenized_dataset/code", "tokenized_dataset/prose")
             and runs_done(instance), "no tokenization", 240, log)
        # Retrain at the next minute; stopped once that tick has launched its run.
        dagster(instance_env, "schedule", "start", "retrain_schedule", "-w", "workspace.yaml")
        by_schedule = dg.RunsFilter(tags={"dagster/schedule_name": "retrain_schedule"})
        wait(lambda: instance.get_runs(filters=by_schedule), "no scheduled retraining", 120, log)
        dagster(instance_env, "schedule", "stop", "retrain_schedule", "-w", "workspace.yaml")
        wait(lambda: runs_done(instance), "runs still in progress", 300, log)
        scheduled = instance.get_runs(filters=by_schedule)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        finally:
            if _group_alive(daemon.pid):
                os.killpg(daemon.pid, signal.SIGKILL)

    runs = instance.get_runs()
    assert runs and all(run.status.value == "SUCCESS" for run in runs), [(r.run_id, r.status) for r in runs]
    assert materialized(instance, "raw_corpus", "merged_dataset", "trained_model", "model_eval")
    assert instance.get_dynamic_partitions("checkpoints")  # model_checkpoint partitions
    launched = [t for t in ticks(instance, "retrain_schedule") if t.run_ids]
    assert all(t.status == TickStatus.SUCCESS for t in launched)
    assert sorted(run_id for t in launched for run_id in t.run_ids) == sorted(r.run_id for r in scheduled)
    assert ticks(instance, "raw_corpus_sensor")
    automation = ticks(instance, "tokenize_on_raw_corpus")
    assert {run_id for t in automation for run_id in t.run_ids} & {r.run_id for r in runs}

    cli = dagster(instance_env, "asset", "materialize", "-m", "pipelines.definitions", "--select", "merged_dataset")
    assert "'mixture_integrity' on 'merged_dataset' passed" in cli.stderr
    merges = instance.fetch_materializations(dg.AssetKey("merged_dataset"), limit=10).records
    assert len(merges) == 2 and len({m.asset_materialization.tags["dagster/data_version"] for m in merges}) == 1
