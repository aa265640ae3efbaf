"""The Dagster graph with its raw corpora, token stores and mixture on S3 (a moto server):
materialized in process, and the raw-corpus sensor listing a bucket prefix."""

import json

import dagster as dg
import pytest
from blues_project import TRAINING
from s3_server import upload_tree
from test_pipelines import DATASETS, EVERYTHING, MERGED, TOKENIZED_ASSETS, metadata, resources

from blues_train.data.store import read_manifest
from blues_train.io import storage
from blues_train.io.errors import BluesError
from pipelines import assets
from pipelines.config import load_project_config
from pipelines.sensors import build_raw_corpus_sensor

pytestmark = pytest.mark.filterwarnings("ignore::dagster.PreviewWarning")


def write_s3_project(s3, root, corpus_dir, prefix: str) -> object:
    """config.json whose sources, stores and mixture are s3:// URIs; training into `root/runs`."""
    upload_tree(s3.client, corpus_dir, s3.bucket("dagraw"), f"{prefix}/corpus")
    s3.bucket("dagdata")
    config = {
        "datasets": {"paths": [f"s3://dagdata/{prefix}/stores/code", f"s3://dagdata/{prefix}/stores/prose"],
                     "weights": [0.3, 0.7], "merge_strategy": "weighted"},
        "sources": [
            {"name": "code", "input": f"s3://dagraw/{prefix}/corpus/code", "glob": "**/*.jsonl.zst"},
            {"name": "prose", "input": f"s3://dagraw/{prefix}/corpus/prose/texts", "glob": "**/*"},
        ],
        "mixture": {"output": f"s3://dagdata/{prefix}/stores/merged", "val_fraction": 0.05},
        "training": {**TRAINING, "max_steps": 1, "out": "runs"},
        "evaluation": {"prompts": ["def "], "max_length": 4, "val_windows": 1},
    }
    path = root / "config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.slow
def test_whole_graph_on_s3(s3, sample_corpus_dir, tmp_path):
    project = write_s3_project(s3, tmp_path, sample_corpus_dir, "graph")
    with dg.instance_for_test() as instance:
        result = dg.materialize(EVERYTHING, selection=TOKENIZED_ASSETS, instance=instance,
                                resources=resources(project))
        assert result.success
        assert all(e.passed for e in result.get_asset_check_evaluations())
        for name in DATASETS:
            manifest = read_manifest(f"s3://dagdata/graph/stores/{name}")
            assert metadata(result, f"tokenized_dataset/{name}")["fingerprint"] == manifest["fingerprint"]
        result = dg.materialize(EVERYTHING, selection=[MERGED, assets.trained_model, assets.model_eval],
                                instance=instance, resources=resources(project))
        assert result.success
        assert all(e.passed for e in result.get_asset_check_evaluations())
        assert storage.path("s3://dagdata/graph/stores/merged/mixture.json").is_file()
        [checkpoint] = instance.get_dynamic_partitions("checkpoints")
        record = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=assets.model_checkpoint.key, asset_partitions=[checkpoint]), limit=1).records[0]
        datasets = {r.data["dataset"] for r in record.asset_materialization.metadata["token_stores"].value.records}
        assert datasets == set(DATASETS)
        assert metadata(result, "model_eval")["perplexity"] > 1


def test_raw_corpus_sensor_lists_a_bucket_prefix(s3, sample_corpus_dir, tmp_path):
    project = write_s3_project(s3, tmp_path, sample_corpus_dir, "sensor")
    resource = {"project": resources(project)["project"]}
    sensor = build_raw_corpus_sensor(TOKENIZED_ASSETS)
    with dg.instance_for_test() as instance:
        def evaluate(previous=None):
            return sensor(dg.build_sensor_context(instance=instance, cursor=previous and previous.cursor,
                                                  resources=resource))

        first = evaluate()
        assert sorted(e.partition for e in first.asset_events) == DATASETS
        instance.add_dynamic_partitions("datasets", DATASETS)
        assert evaluate(first).asset_events == []
        s3.client.put_object(Bucket="dagraw", Key="sensor/corpus/prose/texts/new.txt", Body=b"A new document.\n")
        changed = evaluate(first)
        assert [e.partition for e in changed.asset_events] == ["prose"]
        assert evaluate(changed).asset_events == []


def test_training_out_on_s3_is_refused_in_the_graph_as_one_line(s3, sample_corpus_dir, tmp_path):
    project = write_s3_project(s3, tmp_path, sample_corpus_dir, "refused")
    raw = json.loads(project.read_text())
    raw["training"]["out"] = "s3://dagdata/refused/runs"
    project.write_text(json.dumps(raw))
    with pytest.raises(BluesError, match=r"training.out s3://dagdata/refused/runs: the Dagster graph trains into a local"):
        load_project_config(project)
