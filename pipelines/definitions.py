"""The Blues code location: `dagster dev -w workspace.yaml`, or `-m pipelines.definitions`."""

import dagster as dg

from pipelines import assets, checks
from pipelines.config import load_project_config
from pipelines.resources import build_resources
from pipelines.schedules import retrain_job, retrain_schedule
from pipelines.sensors import raw_corpus_sensor

defs = dg.Definitions(
    assets=[
        assets.raw_corpus, *assets.tokenized_datasets, assets.merged_dataset,
        assets.trained_model, assets.model_checkpoint, assets.model_eval,
    ],
    asset_checks=[checks.token_store_integrity, checks.mixture_integrity, checks.tokenizer_consistency],
    jobs=[retrain_job],
    schedules=[retrain_schedule(load_project_config())],
    sensors=[raw_corpus_sensor],
    resources=build_resources(),
    # Asset bodies are thin; prepare has its own worker processes and training runs in
    # its own process through Pipes. One process per run saves a process spawn per step.
    executor=dg.in_process_executor,
)
