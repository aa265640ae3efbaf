"""Smoke test of the UI server: `dagster dev` on loopback from the repository root, launch
`merged_dataset` through GraphQL, wait for success (and for the sensor's tokenization
runs), stop the server by its process id."""

import time

import pytest
from dagster_graphql import DagsterGraphQLClient

from blues_project import write_project
from blues_train.mixture import read_mixture
from blues_train.prepare import prepare_dataset
from dagster_server import dagster_dev, graphql, wait_for_runs
from pipelines.config import load_project_config

SENSOR_RUNS = """{ runsOrError(filter: {tags: [{key: "dagster/sensor_name", value: "raw_corpus_sensor"}]}) {
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

        # The raw-corpus sensor runs by default: it registers both datasets as raw_corpus
        # partitions and requests their tokenization, one run per tokenized_dataset asset.
        while len(sensor_runs := graphql(port, SENSOR_RUNS)["runsOrError"]["results"]) < 2:
            assert time.monotonic() < deadline, f"the sensor launched {len(sensor_runs)} run(s)"
            time.sleep(1)
        wait_for_runs(port)
        runs = graphql(port, SENSOR_RUNS)["runsOrError"]["results"]
        assert sorted((r["status"], "/".join(key["path"])) for r in runs for key in r["assetSelection"]) == [
            ("SUCCESS", "tokenized_dataset/code"), ("SUCCESS", "tokenized_dataset/prose")]
    assert read_mixture(config.mixture.output)["strategy"] == "weighted"
