"""Resources: the project configuration file and the Pipes client that launches training."""

from __future__ import annotations

import dagster as dg

from pipelines.config import ProjectConfig, default_config_path, load_project_config


class BluesProject(dg.ConfigurableResource):
    """The project configuration file; read and validated at each use, so edits (other
    weights, sources, settings) take effect on the next run without reloading the code. A
    new dataset also needs a reload: its `tokenized_dataset/<name>` asset is built then."""

    config_path: str

    def load(self) -> ProjectConfig:
        return load_project_config(self.config_path)


def build_resources() -> dict:
    return {
        "project": BluesProject(config_path=str(default_config_path())),
        "pipes": dg.PipesSubprocessClient(),
    }
