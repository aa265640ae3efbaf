"""The Blues code location: `dagster dev -w workspace.yaml`, `-m pipelines.definitions`, or `dg dev`.

The definitions load lazily (`@dg.definitions`): importing `pipelines` reads no project
configuration; loading the code location does, and builds one tokenized_dataset asset per
configured dataset. A bad configuration is then one line, `error: ...`, the first thing
the loading command prints.
"""

import dagster as dg

from pipelines import assets, checks, export_assets
from pipelines.config import ProjectConfig, load_project_config
from pipelines.resources import build_resources, dagster_failure
from pipelines.schedules import retrain_job, retrain_schedule
from pipelines.sensors import build_raw_corpus_sensor, build_tokenize_automation


@dg.definitions
def defs() -> dg.Definitions:
    with dagster_failure(echo=True):
        return build_definitions(load_project_config())


def build_definitions(config: ProjectConfig) -> dg.Definitions:
    tokenized, combined = assets.build_data_assets(config)
    return dg.Definitions(
        assets=[assets.raw_corpus, *tokenized, *combined, assets.trained_model, assets.model_checkpoint,
                assets.model_eval, export_assets.hf_model],
        asset_checks=[checks.build_token_store_integrity(tokenized), checks.mixture_integrity,
                      checks.tokenizer_consistency],
        jobs=[retrain_job],
        schedules=[retrain_schedule(config)],
        sensors=[build_raw_corpus_sensor(tokenized), build_tokenize_automation(tokenized)],
        resources=build_resources(),
        # Asset bodies are thin; prepare has its own worker processes and training runs in
        # its own process through Pipes. One process per run saves a process spawn per step.
        executor=dg.in_process_executor,
    )
