"""prepare on Ray: the store is byte-identical to the local executor's, whatever the workers, a
worker killed mid-task, a node stopped mid-run, inputs on S3; errors come back as Blues' own.

One local Ray instance (2 CPUs) for the module, started after the S3 server so that its
workers reach it; the two-node cluster is `ray start` twice on this machine, on ports of its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from s3_server import free_port, upload_tree
from training_runs import ROOT, env

from blues_train.data.prepare import prepare_dataset
from blues_train.io import storage
from blues_train.io.errors import BluesError

# The cluster's processes and its clients: token authentication off (a cluster on 127.0.0.1 that the
# test owns; a token file in ~/.ray is shared with every other Ray instance on the machine).
CLUSTER_ENV = {**env(2), "RAY_AUTH_MODE": "disabled"}
ITEM = 100_000  # bytes of input per work item: the corpus in many items
CHUNK = 4000


@pytest.fixture(scope="module")
def ray_local(s3):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def every_format(sample_corpus_dir, tmp_path_factory):
    """The sample corpus (JSONL.zst, Parquet, CSV, text) and its code as plain JSONL (cut into ranges),
    the folder first (as `blues prepare` takes --input_dir before --dataset)."""
    folder = tmp_path_factory.mktemp("every_format")
    plain = folder / "plain" / "stdlib.jsonl"
    plain.parent.mkdir()
    plain.write_bytes(zstandard.ZstdDecompressor().decompressobj().decompress(
        (sample_corpus_dir / "code" / "stdlib.jsonl.zst").read_bytes()))
    shutil.copytree(sample_corpus_dir, folder / "corpus")
    inputs = [str(folder / "corpus" / "prose"), str(folder / "corpus" / "code" / "stdlib.jsonl.zst"), str(plain)]
    return folder, inputs


@pytest.fixture(scope="module")
def local_store(every_format, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "store"
    prepare_dataset(every_format[1], out, glob="**/*", workers=1, chunk_tokens=CHUNK, item_bytes=ITEM,
                    progress=False)
    return out


def assert_same_store(expected: Path, actual) -> None:
    """Every file of `expected` (manifest, chunks, indexes) has the same bytes in `actual`, and nothing more."""
    names = sorted(p.name for p in expected.iterdir())
    found = sorted(storage.path(uri).name for uri, _, _ in storage.list_files(actual, "*"))
    assert found == names
    for name in names:
        assert storage.read_bytes(storage.path(actual) / name) == (expected / name).read_bytes(), name


def test_ray_store_is_the_local_store_for_every_format(ray_local, every_format, local_store, tmp_path):
    manifest = prepare_dataset(every_format[1], tmp_path / "ray", glob="**/*", chunk_tokens=CHUNK,
                               item_bytes=ITEM, progress=False, executor_name="ray")
    assert {s["format"] for s in manifest["sources"]} == {"jsonl.zst", "jsonl", "parquet", "csv", "text"}
    assert len({c["file"].split("-")[1] for c in manifest["chunks"]}) > 5  # many items, run on 2 workers
    assert_same_store(local_store, tmp_path / "ray")
    one = prepare_dataset(every_format[1], tmp_path / "one", glob="**/*", chunk_tokens=CHUNK, item_bytes=ITEM,
                          progress=False, executor_name="ray", workers=1)
    assert one == manifest


def test_a_worker_killed_mid_task_is_retried_and_the_store_is_the_same(ray_local, every_format, local_store,
                                                                      tmp_path):
    killed = []

    def kill_one_task_process():
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            for proc in psutil.process_iter(["cmdline"]):
                if (proc.info["cmdline"] or [""])[0].startswith("ray::write_item"):
                    time.sleep(0.05)  # mid-task
                    proc.kill()
                    killed.append(proc.pid)
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one_task_process)
    killer.start()
    prepare_dataset(every_format[1], tmp_path / "ray", glob="**/*", chunk_tokens=CHUNK, item_bytes=ITEM,
                    progress=False, executor_name="ray")
    killer.join()
    assert killed
    assert_same_store(local_store, tmp_path / "ray")


def test_s3_inputs_are_read_by_the_ray_workers(ray_local, s3, every_format, local_store):
    folder = every_format[0]
    upload_tree(s3.client, folder / "corpus", s3.bucket("ray-raw"), "corpus")
    s3.client.upload_file(str(folder / "plain" / "stdlib.jsonl"), "ray-raw", "plain/stdlib.jsonl")
    s3.bucket("ray-data")
    inputs = ["s3://ray-raw/corpus/prose", "s3://ray-raw/corpus/code/stdlib.jsonl.zst", "s3://ray-raw/plain/stdlib.jsonl"]
    prepare_dataset(inputs, "s3://ray-data/store", glob="**/*", chunk_tokens=CHUNK, item_bytes=ITEM,
                    progress=False, executor_name="ray")
    assert_same_store(local_store, "s3://ray-data/store")


def test_an_error_inside_a_ray_task_is_the_blues_error(ray_local, tmp_path):
    pq.write_table(pa.table({"text": pa.array([1, 2, 3])}), tmp_path / "numbers.parquet")
    (tmp_path / "bad.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "a"}\n' * 100)[:-5])
    with pytest.raises(BluesError, match=r"^numbers\.parquet: column 'text' is int64, not text$"):
        prepare_dataset([tmp_path / "numbers.parquet"], tmp_path / "out", progress=False, executor_name="ray")
    with pytest.raises(BluesError, match=r"^bad\.jsonl\.zst: truncated zstd stream"):
        prepare_dataset([tmp_path / "bad.jsonl.zst"], tmp_path / "out", progress=False, executor_name="ray")


class Node:
    """`ray start --block` in a session of its own: stopped by killing that session only."""

    def __init__(self, *flags):
        ports = ["--node-manager-port", "--object-manager-port", "--metrics-export-port",
                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
        command = [str(Path(sys.executable).with_name("ray")), "start", "--block", *map(str, flags)]
        for flag in ports:
            command += [flag, str(free_port())]
        self.proc = subprocess.Popen(command, env=CLUSTER_ENV, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def wait_for_nodes(address: str, count: int, node: Node) -> bool:
    """Whether the cluster at `address` answers with `count` live nodes (its head may still be
    starting) before `node`, the last started, exits (a port taken between free_port() and
    `ray start`) or two minutes pass."""
    probe = ("import ray, time; ray.init(address='{}', log_to_driver=False)\n"
             "while len([n for n in ray.nodes() if n['Alive']]) < {}: time.sleep(0.2)").format(address, count)
    deadline = time.monotonic() + 120
    while node.proc.poll() is None:
        with subprocess.Popen([sys.executable, "-c", probe], env=CLUSTER_ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) as waiting:
            while waiting.poll() is None and node.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            waiting.kill()
        if waiting.returncode == 0:
            return True
        assert time.monotonic() < deadline, f"no Ray cluster of {count} node(s) at {address}"
        time.sleep(1)
    return False


def started(address: str, count: int, *flags) -> Node:
    """A node started with `flags`, once the cluster at `address` has `count` live nodes;
    started again on other ports when `ray start` exits first."""
    for _ in range(3):
        node = Node(*flags)
        if wait_for_nodes(address, count, node):
            return node
        node.stop()
    raise AssertionError(f"ray start {' '.join(map(str, flags))} exited three times")


def test_two_node_cluster_loses_a_node_mid_prepare_and_the_store_is_the_same(every_format, local_store, tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = started(address, 1, "--head", "--node-ip-address", "127.0.0.1", "--port", port, "--num-cpus", 1,
                   "--include-dashboard", "false", "--ray-client-server-port", free_port(), "--min-worker-port", 0,
                   "--max-worker-port", 0)
    other = None
    try:
        other = started(address, 2, "--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", 2,
                        "--resources", '{"second_node": 1}', "--min-worker-port", 0, "--max-worker-port", 0)
        out = tmp_path / "cluster"
        command = [sys.executable, "-m", "blues_train.cli", "prepare", "--cache_dir", str(out), "--glob", "**/*",
                   "--chunk_tokens", str(CHUNK), "--item_bytes", str(ITEM), "--executor", "ray",
                   "--ray_address", address]
        for given in every_format[1]:
            command += ["--input_dir" if Path(given).is_dir() else "--dataset", given]
        proc = subprocess.Popen(command, cwd=ROOT, env=CLUSTER_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 120
        journal = out / ".prepare-journal.jsonl"
        while not journal.exists() or len(journal.read_text().splitlines()) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        other.stop()
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        assert_same_store(local_store, out)
    finally:
        if other is not None:
            other.stop()
        head.stop()


def test_verify_and_dedup_on_ray_give_the_local_results(ray_local, local_store, code_store, prose_store, tmp_path):
    from blues_train.io.executor import make_executor
    from blues_train.mixture.dedup import dedup
    from blues_train.mixture.verify import verify_paths

    damaged = tmp_path / "damaged"
    shutil.copytree(local_store, damaged)
    for name in ("chunk-00000-00001.arrow", "chunk-00003-00000.idx"):
        data = bytearray((damaged / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (damaged / name).write_bytes(bytes(data))
    runner = make_executor("ray")
    local, remote = verify_paths([local_store, damaged]), verify_paths([local_store, damaged], runner=runner)
    assert remote.to_dict() == local.to_dict()
    assert [p.file for p in remote.problems] == [str(damaged / "chunk-00000-00001.arrow"),
                                                 str(damaged / "chunk-00003-00000.idx")]
    quiet = {"say": lambda *_: None}
    here = dedup([code_store, prose_store, local_store], tmp_path / "local", workers=2, **quiet)
    there = dedup([code_store, prose_store, local_store], tmp_path / "ray", executor_name="ray", **quiet)
    assert here == there and here["removals"]["rows"] > 0


def test_dagster_assets_and_checks_run_on_the_configured_ray_cluster(ray_local, tmp_path):
    import json

    import dagster as dg
    from blues_project import write_project

    from pipelines import assets, checks
    from pipelines.config import load_project_config
    from pipelines.resources import BluesProject

    project = write_project(tmp_path, corpus_mb=0.05)
    raw = json.loads(project.read_text())
    raw["executor"] = {"ray": {}}  # the module's Ray instance: the one this process is connected to
    project.write_text(json.dumps(raw))
    config = load_project_config(project)
    assert (config.executor.name, config.executor.ray_address) == ("ray", None)
    tokenized = [assets.build_tokenized_dataset(source.name) for source in config.datasets]
    with dg.instance_for_test() as instance:
        result = dg.materialize([assets.raw_corpus, *tokenized, checks.build_token_store_integrity(tokenized)],
                                selection=tokenized, instance=instance,
                                resources={"project": BluesProject(config_path=str(project))})
        logged = [event.user_message for event in instance.all_logs(result.run_id)]
    assert result.success and all(e.passed for e in result.get_asset_check_evaluations())
    for source in config.datasets:
        [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == source.name]
        shown = {k: getattr(v, "value", v) for k, v in event.materialization.metadata.items()}
        assert shown["executor"] == "ray" and shown["work_items"] == shown["work_items_run"] >= 1
        local = prepare_dataset([source.input], tmp_path / "local" / source.name, glob=source.glob, progress=False)
        assert shown["fingerprint"] == local["fingerprint"]
    assert any(message.startswith("prepare on ray: ") for message in logged)
