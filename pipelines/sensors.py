"""The raw-corpus sensor: new datasets become raw_corpus partitions, new or changed raw
files get tokenized."""

import json

import dagster as dg

from blues_train.errors import BluesError
from blues_train.raw_corpus import list_files, observe, signature
from pipelines.assets import raw_corpus_observation, tokenized_dataset_key
from pipelines.partitions import dataset_partitions
from pipelines.resources import BluesProject


def build_raw_corpus_sensor(tokenized_datasets: list[dg.AssetsDefinition]) -> dg.SensorDefinition:
    """The sensor over the loaded `tokenized_dataset/<name>` assets."""

    @dg.sensor(
        asset_selection=tokenized_datasets,
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def raw_corpus_sensor(context: dg.SensorEvaluationContext, project: BluesProject) -> dg.SensorResult:
        """Every minute: list each configured dataset's raw files (names, sizes, times). A
        dataset seen for the first time becomes a `raw_corpus` partition; one whose files
        changed is hashed, observed as `raw_corpus` and its `tokenized_dataset/<name>` asset is
        requested. A dataset the configuration gained after the code location loaded has no
        asset yet: it is observed, and the log asks for a reload. The cursor holds each
        dataset's listing signature when last observed and when last requested."""
        cursor = json.loads(context.cursor) if context.cursor else {}
        observed, requested = cursor.get("observed", {}), cursor.get("requested", {})
        known = set(context.instance.get_dynamic_partitions(dataset_partitions.name))
        new_partitions, run_requests, observations = [], [], []
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
            if observed.get(source.name) == listing and (not loaded or requested.get(source.name) == listing):
                continue
            files = [{"path": f.label, "format": f.format, "bytes": f.bytes, "sha256": f.sha256}
                     for f in observe([source.input], source.format, source.glob)]
            observation = raw_corpus_observation(source.name, files)
            observations.append(observation)
            observed[source.name] = listing
            if loaded:
                version = observation.tags["dagster/data_version"]
                run_requests.append(dg.RunRequest(asset_selection=[key], run_key=f"{source.name}-{version}"))
                requested[source.name] = listing
        return dg.SensorResult(
            run_requests=run_requests,
            dynamic_partitions_requests=[dataset_partitions.build_add_request(new_partitions)]
            if new_partitions else [],
            asset_events=observations,
            cursor=json.dumps({"observed": observed, "requested": requested}, sort_keys=True),
        )

    return raw_corpus_sensor
