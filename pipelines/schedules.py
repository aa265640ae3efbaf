"""Retraining on a schedule: dedup (when configured), mixture, model and evaluation, at the
configured cron."""

import dagster as dg

from pipelines.assets import MERGED_DATASET, RETRAIN_TAG, model_eval, trained_model
from pipelines.config import ProjectConfig

retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=dg.AssetSelection.assets(MERGED_DATASET, trained_model, model_eval)
    | dg.AssetSelection.tag(*RETRAIN_TAG),
    description="Deduplicate (with a `dedup` section) and merge the tokenized datasets, train a "
    "model on the mixture, evaluate it. Blocking checks stop the run before training on data "
    "that fails them.",
)


def retrain_schedule(config: ProjectConfig) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name="retrain_schedule",
        job=retrain_job,
        cron_schedule=config.retrain_cron,
        execution_timezone="UTC",
        description=f"Retrain at `{config.retrain_cron}` (UTC), from schedule.retrain_cron "
        f"in {config.path.name}. Off until switched on.",
    )
