"""The Dagster code location, in process: definitions, the whole graph on real data with
the small test model, a corrupt chunk stopping training, the schedule and the sensor."""

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pytest
from blues_project import write_project

from blues_train.data.prepare import prepare_dataset
from blues_train.io.errors import BluesError
from blues_train.mixture.merge import merge
from blues_train.serving.eval_tasks import write_tasks
from blues_train.mixture.verify import verify_paths
from blues_train.training.checkpoint import read_meta
from pipelines import assets, checks, definitions
from pipelines.config import EvalConfig, TrainConfig, load_project_config, parse_project_config, with_overrides
from pipelines.home import ensure_dagster_home
from pipelines.resources import BluesProject
from pipelines.schedules import retrain_job, retrain_schedule
from pipelines.sensors import build_raw_corpus_sensor

DATASETS = ["code", "prose"]  # those of every project blues_project.write_project makes
TOKENIZED = [f"tokenized_dataset/{name}" for name in DATASETS]
TOKENIZED_ASSETS = [assets.build_tokenized_dataset(name) for name in DATASETS]
MERGED = assets.build_merged_dataset(TOKENIZED_ASSETS)
CHECKS = [checks.build_token_store_integrity(TOKENIZED_ASSETS), checks.mixture_integrity,
          checks.tokenizer_consistency]
EVERYTHING = [
    assets.raw_corpus, *TOKENIZED_ASSETS, MERGED, assets.trained_model,
    assets.model_checkpoint, assets.model_eval, *CHECKS,
]
pytestmark = pytest.mark.filterwarnings("ignore::dagster.PreviewWarning")  # raised inside Dagster Pipes


def resources(config_path):
    return {"project": BluesProject(config_path=str(config_path)), "pipes": dg.PipesSubprocessClient()}


def tokenize_all(instance, config_path, **kwargs):
    return dg.materialize(EVERYTHING, selection=TOKENIZED_ASSETS, instance=instance,
                          resources=resources(config_path), **kwargs)


def metadata(result, asset):
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return {k: getattr(v, "value", v) for k, v in event.step_materialization_data.materialization.metadata.items()}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return write_project(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="module")
def defs(project):
    """The code location as Dagster loads it: the lazy definitions, on the project's file."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BLUES_CONFIG", str(project))
        return definitions.defs()


def test_definitions_load(defs):
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == {"raw_corpus", *TOKENIZED, "merged_dataset", "trained_model", "model_checkpoint", "model_eval",
                    "hf_model"}
    for name, key in zip(DATASETS, TOKENIZED):
        node = graph.get(dg.AssetKey.from_user_string(key))
        assert node.parent_keys == {assets.raw_corpus.key} and not node.is_partitioned
        mapping = node.partition_mappings[assets.raw_corpus.key]
        assert mapping == dg.SpecificPartitionsPartitionMapping([name])
    assert {k.to_user_string() for k in graph.get(MERGED.key).parent_keys} == set(TOKENIZED)
    assert graph.get(dg.AssetKey("trained_model")).pools == {"gpu"}
    blocking = {(spec.asset_key.to_user_string(), spec.name)
                for check in CHECKS for spec in check.check_specs if spec.blocking}
    assert blocking == {*((key, "token_store_integrity") for key in TOKENIZED),
                        ("merged_dataset", "mixture_integrity"), ("merged_dataset", "tokenizer_consistency")}
    assert defs.resolve_job_def("retrain_job") is not None


@pytest.mark.parametrize("edit, field", [
    (lambda c: c["datasets"].update(weights=[1.0]), "datasets.weights"),
    (lambda c: c["sources"][1].pop("input"), "sources[1].input"),
    (lambda c: c["sources"][1].update(name="code"), "sources[1].name"),
    (lambda c: c["datasets"].update(merge_strategy="random"), "datasets.merge_strategy"),
    (lambda c: c["training"].update(launcher="slurm"), "training.launcher"),
    (lambda c: c["training"].update(max_steps=0), "training.max_steps"),
    (lambda c: c["schedule"].update(retrain_cron="every sunday"), "schedule.retrain_cron"),
    (lambda c: c.update(dedup={"output": "d", "threshold": 1.5}), "dedup.threshold"),
    (lambda c: c.update(dedup={"output": "d", "exact": False, "near": False}), "dedup finds nothing"),
])
def test_config_errors_name_the_field(project, edit, field):
    raw = json.loads(project.read_text())
    edit(raw)
    with pytest.raises(BluesError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_project_config(raw, project)


def test_run_config_overrides_are_validated(project):
    config = load_project_config(project)
    assert with_overrides(config, "training", TrainConfig(max_steps=7)).training.max_steps == 7
    with pytest.raises(BluesError, match=r"run config of training\): training.num_gpus"):
        with_overrides(config, "training", TrainConfig(num_gpus=2))


@pytest.mark.slow
def test_whole_graph_materializes(project):
    with dg.instance_for_test() as instance:
        result = tokenize_all(instance, project)
        assert result.success
        evaluations = {e.asset_key.to_user_string(): e for e in result.get_asset_check_evaluations()}
        assert sorted(evaluations) == TOKENIZED
        for name, key in zip(DATASETS, TOKENIZED):
            stats = metadata(result, key)
            assert stats["dagster/row_count"] == stats["documents"] > 0 and stats["tokens"] > 0
            assert stats["compression"] > 1 and stats["skipped"] == 0
            latest = instance.get_latest_materialization_event(dg.AssetKey.from_user_string(key))
            assert latest.asset_materialization.tags["dagster/data_version"] == stats["fingerprint"]
            assert evaluations[key].check_name == "token_store_integrity" and evaluations[key].passed
            observed = instance.fetch_observations(
                dg.AssetRecordsFilter(asset_key=assets.raw_corpus.key, asset_partitions=[name]), limit=1
            ).records[0].asset_observation
            assert observed.metadata["files"].value >= 1 and "dagster/data_version" in observed.tags
        assert sorted(instance.get_dynamic_partitions("datasets")) == DATASETS

        result = dg.materialize(EVERYTHING, selection=[MERGED, assets.trained_model, assets.model_eval],
                                instance=instance, resources=resources(project))
        assert result.success
        assert {e.check_name: e.passed for e in result.get_asset_check_evaluations()} == {
            "mixture_integrity": True, "tokenizer_consistency": True}
        mixture = metadata(result, "merged_dataset")
        shares = {r.data["dataset"]: r.data for r in mixture["shares"].records}
        assert shares["code"]["target_share"] == 0.3 and abs(shares["code"]["realized_share"] - 0.3) < 0.01
        model = metadata(result, "trained_model")
        assert model["steps"] == 2 and model["checkpoints"] == 2 and model["loss_curve"].startswith("![")

        checkpoints = instance.get_dynamic_partitions("checkpoints")
        assert [c.rsplit("-", 1)[1] for c in checkpoints] == ["000001", "000002"]
        records = [instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=assets.model_checkpoint.key, asset_partitions=[key]), limit=1
        ).records[0].asset_materialization for key in checkpoints]
        record = records[-1]
        assert record.metadata["mixture_fingerprint"].value == mixture["fingerprint"]
        assert record.metadata["step"].value == 2 and record.metadata["path"].value == model["checkpoint"]
        # Numbers as float metadata, which Dagster's Plots tab draws across checkpoints.
        assert all(isinstance(r.metadata[name], dg.FloatMetadataValue) for r in records
                   for name in ("loss", "max_expert_load"))
        assert {name for name, value in record.metadata.items() if isinstance(value, dg.FloatMetadataValue)} == {
            "loss", "val_loss", "perplexity", "max_expert_load"}
        assert record.metadata["perplexity"].value == pytest.approx(math.exp(record.metadata["val_loss"].value))

        # Data versions are content hashes: each checkpoint's weights, the final one's for the model.
        weights = [read_meta(r.metadata["path"].value)["files"]["model.safetensors"] for r in records]
        assert [r.tags["dagster/data_version"] for r in records] == weights
        latest = instance.get_latest_materialization_event(assets.trained_model.key).asset_materialization
        assert latest.tags["dagster/data_version"] == weights[-1] and model["model_checkpoint"] == checkpoints[-1]
        # A checkpoint's lineage reads back to the token stores and the raw files' sha256.
        stores = {row.data["dataset"]: row.data for row in record.metadata["token_stores"].value.records}
        raw_files = record.metadata["raw_files"].value.records
        for name, key in zip(DATASETS, TOKENIZED):
            store = instance.get_latest_materialization_event(dg.AssetKey.from_user_string(key)).asset_materialization
            assert stores[name]["store_fingerprint"] == store.tags["dagster/data_version"]
            observed = instance.fetch_observations(
                dg.AssetRecordsFilter(asset_key=assets.raw_corpus.key, asset_partitions=[name]), limit=1
            ).records[0].asset_observation
            assert stores[name]["raw_corpus_version"] == observed.tags["dagster/data_version"]
            assert {f.data["sha256"] for f in raw_files if f.data["dataset"] == name} == {
                f.data["sha256"] for f in observed.metadata["file_table"].value.records}

        evaluation = metadata(result, "model_eval")
        assert evaluation["perplexity"] > 1 and evaluation["val_tokens"] > 0
        [eval_event] = [e for e in result.get_asset_materialization_events() if e.asset_key == assets.model_eval.key]
        assert all(isinstance(eval_event.materialization.metadata[name], dg.FloatMetadataValue)
                   for name in ("perplexity", "val_loss", "max_expert_load", "min_expert_load"))
        assert evaluation["expert_utilization"].startswith("![expert utilization](data:image/png;base64,")
        assert "def " in evaluation["samples"]
        assert evaluation["model_checkpoint"] == checkpoints[-1] and evaluation["weights_sha256"] == weights[-1]

        # An older checkpoint, chosen in the run config (the UI's launchpad: ops.model_eval.config.checkpoint),
        # also scored on lm-evaluation-harness tasks (blues eval-tasks of the project's mixture).
        tasks = project.parent / "eval_tasks"
        write_tasks(load_project_config(project).mixture.output, tasks)
        older = dg.materialize(EVERYTHING, selection=[assets.model_eval], instance=instance,
                               resources=resources(project),
                               run_config=dg.RunConfig({"model_eval": EvalConfig(
                                   checkpoint=checkpoints[0], tasks=["blues_cloze"], include_path=str(tasks), limit=2)}))
        assert older.success
        evaluation = metadata(older, "model_eval")
        assert (evaluation["model_checkpoint"], evaluation["step"]) == (checkpoints[0], 1)
        assert evaluation["weights_sha256"] == weights[0]
        assert 0 <= evaluation["lm_eval/blues_cloze/acc"] <= 1 and evaluation["lm_eval/blues_cloze/perplexity"] > 1
        results = json.loads(Path(evaluation["lm_eval_results"]).read_text())
        assert results["results"]["blues_cloze"]["acc,none"] == evaluation["lm_eval/blues_cloze/acc"]
        unknown = dg.materialize(EVERYTHING, selection=[assets.model_eval], instance=instance,
                                 resources=resources(project), raise_on_error=False,
                                 run_config=dg.RunConfig({"model_eval": EvalConfig(checkpoint="run-x-step-000009")}))
        [failure] = [e for e in unknown.all_events if e.event_type_value == "STEP_FAILURE"]
        assert failure.step_failure_data.user_failure_data.description == (
            f"model_checkpoint has no partition 'run-x-step-000009'; the latest is {checkpoints[-1]!r}")


def test_merged_dataset_reports_the_shares_verify_realizes(tmp_path):
    project = write_project(tmp_path, corpus_mb=0.05)
    config = load_project_config(project)
    for source in config.datasets:
        prepare_dataset([source.input], source.token_store, glob=source.glob, progress=False)
    with dg.instance_for_test() as instance:
        result = dg.materialize(EVERYTHING, selection=[MERGED], instance=instance,
                                resources=resources(project))
        logged = [event.user_message for event in instance.all_logs(result.run_id)]
    assert result.success
    reported = [r.data["realized_share"] for r in metadata(result, "merged_dataset")["shares"].records]
    verified = verify_paths([config.mixture.output]).mixtures[0]["sources"]
    assert reported == [round(s["realized"], 4) for s in verified]
    assert any(message.startswith("warning: ") and "is repeated" in message for message in logged)


@pytest.mark.slow
def test_corrupt_chunk_blocks_training(tmp_path):
    project = write_project(tmp_path, corpus_mb=0.05)
    with dg.instance_for_test() as instance:
        assert tokenize_all(instance, project).success
        chunk = tmp_path / "stores" / "code" / "chunk-00000-00000.arrow"
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))

        retokenized = tokenize_all(instance, project, raise_on_error=False)
        checked = {e.asset_key.to_user_string(): e for e in retokenized.get_asset_check_evaluations()}
        assert not retokenized.success and checked["tokenized_dataset/prose"].passed
        check = checked["tokenized_dataset/code"]
        assert not check.passed
        assert "chunk-00000-00000.arrow" in check.metadata["details"].value

        result = dg.materialize(EVERYTHING, selection=[MERGED, assets.trained_model, assets.model_eval],
                                instance=instance, resources=resources(project), raise_on_error=False)
        assert not result.success
        evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert not evaluations["mixture_integrity"].passed
        assert "chunk-00000-00000.arrow" in evaluations["mixture_integrity"].metadata["details"].value
        assert result.asset_materializations_for_node("trained_model") == []
        assert instance.get_latest_materialization_event(assets.trained_model.key) is None
        assert not (tmp_path / "runs").exists()


def test_retrain_schedule(project, defs):
    schedule = retrain_schedule(load_project_config(project))
    assert schedule.cron_schedule == "15 4 * * 1"
    when = datetime(2026, 11, 30, 4, 15, tzinfo=timezone.utc)
    [request] = schedule.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=when)).run_requests
    assert request.job_name in (None, "retrain_job")
    selected = retrain_job.selection.resolve(defs.resolve_asset_graph())
    assert {k.to_user_string() for k in selected} == {"merged_dataset", "trained_model", "model_eval"}
    checks_run = defs.resolve_job_def("retrain_job").asset_layer.asset_graph.asset_check_keys
    assert {key.name for key in checks_run} == {"mixture_integrity", "tokenizer_consistency"}


def test_raw_corpus_sensor(tmp_path, capfd):
    """The sensor sees files: new datasets become partitions, changed files observations
    with a new data version. It requests no run: automation does (test_dagster_versions)."""
    project = write_project(tmp_path, corpus_mb=0.05)
    resource = {"project": BluesProject(config_path=str(project))}
    sensor = build_raw_corpus_sensor(TOKENIZED_ASSETS)

    def evaluate(previous=None):
        result = sensor(dg.build_sensor_context(
            instance=instance, cursor=previous and previous.cursor, resources=resource))
        assert result.run_requests == []
        return result

    with dg.instance_for_test() as instance:
        first = evaluate()
        [added] = first.dynamic_partitions_requests
        assert sorted(added.partition_keys) == DATASETS
        assert sorted(e.partition for e in first.asset_events) == DATASETS
        versions = {e.partition: e.tags["dagster/data_version"] for e in first.asset_events}
        instance.add_dynamic_partitions("datasets", added.partition_keys)

        quiet = evaluate(first)
        assert quiet.dynamic_partitions_requests == [] and quiet.asset_events == []

        new_file = tmp_path / "corpus" / "prose" / "texts" / "new.txt"
        new_file.write_text("A new document arrived in the prose corpus.\n")
        changed = evaluate(quiet)
        assert [e.partition for e in changed.asset_events] == ["prose"]
        assert changed.asset_events[0].tags["dagster/data_version"] != versions["prose"]
        assert changed.dynamic_partitions_requests == []

        # A dataset added to the file after the code location loaded: a raw_corpus partition
        # and an observation now, its tokenization once the definitions are reloaded.
        raw = json.loads(project.read_text())
        raw["datasets"]["paths"].append("stores/more_code")
        raw["datasets"]["weights"].append(0.2)
        raw["sources"].append({"name": "more_code", "input": "corpus/code", "glob": "**/*.jsonl.zst"})
        project.write_text(json.dumps(raw))
        grown = evaluate(changed)
        assert grown.dynamic_partitions_requests[0].partition_keys == ["more_code"]
        assert [e.partition for e in grown.asset_events] == ["more_code"]
        warning = capfd.readouterr().err
        assert "dataset more_code is in" in warning and "reload the code location" in warning
        instance.add_dynamic_partitions("datasets", ["more_code"])
        assert evaluate(grown).asset_events == []


@pytest.mark.slow
def test_deepspeed_launcher_reports_from_rank_zero(tmp_path, capfd):
    """Two ranks under the DeepSpeed launcher (gloo on a CPU): rank 0 alone opens Pipes,
    so the run yields one trained_model materialization and one record per checkpoint;
    the launcher is told it runs on the CPU rather than guessing aloud."""
    project = write_project(tmp_path, corpus_mb=0.05)
    config = load_project_config(project)
    for source in config.datasets:
        prepare_dataset([source.input], source.token_store, glob=source.glob, progress=False)
    merge([d.token_store for d in config.datasets], config.mixture.output, weights=[0.3, 0.7],
          val_fraction=config.mixture.val_fraction)
    run_config = dg.RunConfig({"trained_model": TrainConfig(launcher="deepspeed", num_gpus=2, max_steps=1)})
    with dg.instance_for_test() as instance:
        result = dg.materialize(EVERYTHING, selection=[assets.trained_model], run_config=run_config,
                                instance=instance, resources=resources(project))
        assert result.success
        assert metadata(result, "trained_model")["checkpoints"] == 1
        [checkpoint] = instance.get_dynamic_partitions("checkpoints")
        assert checkpoint.endswith("-step-000001")
    assert "Setting accelerator to CPU" not in capfd.readouterr().err


def test_dagster_home_template(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(ensure_dagster_home(tmp_path / "home")))
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert not instance.telemetry_enabled
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1  # the gpu pool


def test_dedup_result_sits_between_the_datasets_and_the_mixture(tmp_path):
    """With a `dedup` section: dedup_result reads every tokenized dataset, reports removals
    per dataset and sample pairs as text, and merged_dataset merges with its result."""
    project = write_project(tmp_path, corpus_mb=0.05)
    texts = tmp_path / "corpus" / "prose" / "texts"
    credits = (texts / "idlelib" / "CREDITS.txt").read_text()
    (texts / "zz_credits_copy.txt").write_text(credits)
    extend = (texts / "idlelib" / "extend.txt").read_text()
    (texts / "zz_extend_edited.txt").write_text("Retrieved on 2024-05-01.\n" + extend)
    raw = json.loads(project.read_text())
    raw["dedup"] = {"output": "stores/dedup", "threshold": 0.8}
    project.write_text(json.dumps(raw))
    config = load_project_config(project)
    defs = definitions.build_definitions(config)
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get(assets.DEDUP_RESULT).parent_keys} == set(TOKENIZED)
    assert assets.DEDUP_RESULT in graph.get(assets.MERGED_DATASET).parent_keys
    assert assets.DEDUP_RESULT in retrain_job.selection.resolve(graph)
    for source in config.datasets:
        prepare_dataset([source.input], source.token_store, glob=source.glob, progress=False)
    tokenized, combined = assets.build_data_assets(config)
    with dg.instance_for_test() as instance:
        result = dg.materialize([assets.raw_corpus, *tokenized, *combined, *CHECKS[1:]], selection=combined,
                                instance=instance, resources=resources(project))
    assert result.success
    assert {e.check_name: e.passed for e in result.get_asset_check_evaluations()} == {
        "mixture_integrity": True, "tokenizer_consistency": True}
    shown = metadata(result, "dedup_result")
    removed = {r.data["dataset"]: r.data for r in shown["removals"].records}
    assert shown["removed_documents/prose"] == removed["prose"]["exact"] + removed["prose"]["near"]
    assert removed["prose"]["exact"] >= 1 and removed["prose"]["near"] >= 1
    assert shown["removed_documents"] == shown["removed_documents/prose"] + shown["removed_documents/code"]
    event = [e for e in result.get_asset_materialization_events() if e.asset_key == assets.DEDUP_RESULT][0]
    assert isinstance(event.materialization.metadata["removed_documents/prose"], dg.IntMetadataValue)
    pairs = shown["removed_pairs"]
    assert "exact copy (estimated Jaccard 1.00)" in pairs and pairs.count(repr(credits[:40])[:-1]) >= 2
    mixture = json.loads((config.mixture.output / "mixture.json").read_text())
    assert mixture["dedup"]["fingerprint"] == shown["fingerprint"]
    assert event.materialization.tags["dagster/data_version"] == shown["fingerprint"]
