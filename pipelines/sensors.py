"""What declarative automation cannot see: files in a folder. The raw-corpus sensor lists
them; a new dataset becomes a raw_corpus partition, new or changed files a raw_corpus
materialization with a new data version (the files were written outside Dagster).
Re-tokenizing on that new version is declarative (`tokenize_on_raw_corpus`, the
tokenized_dataset assets' AutomationCondition)."""

import json

import dagster as dg

from blues_train.data.raw_corpus import list_files, observe, signature
from blues_train.io.errors import BluesError
from pipelines.assets import raw_corpus_observation, tokenized_dataset_key
from pipelines.partitions import dataset_partitions
from pipelines.resources import BluesProject


def build_raw_corpus_sensor(tokenized_datasets: list[dg.AssetsDefinition]) -> dg.SensorDefinition:
    """The sensor over the loaded `tokenized_dataset/<name>` assets."""

    @dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
    def raw_corpus_sensor(context: dg.SensorEvaluationContext, project: BluesProject) -> dg.SensorResult:
        """Every minute: list each configured dataset's raw files (names, sizes, times). A
        dataset seen for the first time becomes a `raw_corpus` partition; one whose files
        changed is hashed, and a new corpus version is reported as a `raw_corpus`
        materialization (data version: the corpus version; new data written outside
        Dagster), which the tokenized_dataset/<name> asset's automation condition sees. A
        dataset the configuration gained after the code location loaded has no asset yet:
        it is reported, and the log asks for a reload. The cursor holds each dataset's
        listing signature and corpus version when last seen."""
        cursor = json.loads(context.cursor) if context.cursor else {}
        observed, versions = cursor.get("observed", {}), cursor.get("versions", {})
        known = set(context.instance.get_dynamic_partitions(dataset_partitions.name))
        new_partitions, reports = [], []
        for source in project.load().datasets:
            try:
                listing = signature(list_files([source.input], source.format, source.glob))
            except BluesError as exc:
                context.log.warning(f"dataset {source.name}: {exc}")
                continue
            if source.name not in known:
                new_partitions.append(source.name)
            key = tokenized_dataset_key(source.name)
            loaded = any(asset.key == key for asset in tokenized_datasets)
            if not loaded:
                context.log.warning(f"dataset {source.name} is in {project.config_path} but not in the "
                                    "loaded definitions: reload the code location to tokenize it")
            if observed.get(source.name) == listing:
                continue
            files = [{"path": f.label, "format": f.format, "bytes": f.bytes, "sha256": f.sha256}
                     for f in observe([source.input], source.format, source.glob)]
            report = raw_corpus_observation(source.name, files, event=dg.AssetMaterialization)
            observed[source.name] = listing
            version = report.tags["dagster/data_version"]
            if versions.get(source.name) != version:  # not for a file merely touched
                reports.append(report)
                versions[source.name] = version
        return dg.SensorResult(
            dynamic_partitions_requests=[dataset_partitions.build_add_request(new_partitions)]
            if new_partitions else [],
            asset_events=reports,
            cursor=json.dumps({"observed": observed, "versions": versions}, sort_keys=True),
        )

    return raw_corpus_sensor


def build_tokenize_automation(tokenized_datasets: list[dg.AssetsDefinition]) -> dg.AutomationConditionSensorDefinition:
    """Evaluates the tokenized_dataset assets' automation condition (assets.TOKENIZE_WHEN):
    a tokenization run for each dataset missing from the instance or whose raw corpus got a
    new data version. On by default, like the raw_corpus_sensor that feeds it."""
    return dg.AutomationConditionSensorDefinition(
        "tokenize_on_raw_corpus",
        target=dg.AssetSelection.assets(*tokenized_datasets),
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Tokenizes a dataset that is missing, or whose raw_corpus partition has a new data version.",
    )
