"""Resources: the project configuration file and the Pipes client that launches training."""

from __future__ import annotations

import sys
from contextlib import contextmanager

import dagster as dg

from blues_train.io.errors import BluesError
from pipelines.config import ProjectConfig, default_config_path, load_project_config


class BluesProject(dg.ConfigurableResource):
    """The project configuration file; read and validated at each use, so edits (other
    weights, sources, settings) take effect on the next run without reloading the code. A
    new dataset also needs a reload: its `tokenized_dataset/<name>` asset is built then."""

    config_path: str

    def load(self) -> ProjectConfig:
        with dagster_failure():
            return load_project_config(self.config_path)


@contextmanager
def dagster_failure(echo: bool = False):
    """A bad configuration reads in Dagster as its one line, not as a stack trace (and is
    not retried: it stays bad). With `echo` the line is printed to stderr too, first: a
    command loading the code location (`dagster asset list`, `dagster dev`) prints its
    traceback after it."""
    try:
        yield
    except BluesError as exc:
        if echo:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        raise dg.Failure(description=str(exc), allow_retries=False) from None


def build_resources() -> dict:
    return {
        "project": BluesProject(config_path=str(default_config_path())),
        "pipes": dg.PipesSubprocessClient(),
    }
