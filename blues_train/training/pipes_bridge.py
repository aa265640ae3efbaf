"""Report a training run to Dagster through Pipes: logs, checkpoints, final metrics.

When Dagster launches training (`trained_model`), `DAGSTER_PIPES_CONTEXT` is set in every
rank's environment. Only rank 0 may open Pipes: a second writer makes Dagster fail the
step. Every other rank, and any run outside Dagster, gets a reporter that does nothing,
so the training loop calls it unconditionally:

    with open_reporter(rank) as reporter:
        reporter.log("step 10 loss 9.21")
        reporter.checkpoint(path, step=10, loss=9.21, mixture_fingerprint=fp)
        reporter.finish({"final_loss": 8.7, "steps": 60})

`dagster_pipes` is imported only inside a Dagster launch, so plain training never needs it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from blues_train.io import storage

CONTEXT_ENV = "DAGSTER_PIPES_CONTEXT"
CHECKPOINT = "checkpoint"


class Reporter:
    """Rank 0's line to Dagster (a no-op when `pipes` is None)."""

    def __init__(self, pipes=None):
        self.pipes = pipes

    def log(self, message: str) -> None:
        """A line in the Dagster run's event log (stdout goes to its compute logs anyway)."""
        if self.pipes is not None:
            self.pipes.log.info(message)

    def checkpoint(self, path, *, step: int, **figures) -> None:
        """A saved checkpoint; Dagster records it as a `model_checkpoint` partition.

        `figures`: JSON values such as loss, val_loss, mixture_fingerprint.
        """
        if self.pipes is not None:
            payload = {"kind": CHECKPOINT, "path": storage.display(path), "step": int(step)}
            self.pipes.report_custom_message({**figures, **payload})

    def finish(self, metrics: dict) -> None:
        """The run's final figures: the metadata of the `trained_model` materialization."""
        if self.pipes is not None:
            self.pipes.report_asset_materialization(metadata=dict(metrics))


@contextmanager
def open_reporter(rank: int = 0) -> Iterator[Reporter]:
    """Pipes for rank 0 of a Dagster launch; a silent reporter everywhere else."""
    if rank != 0 or not os.environ.get(CONTEXT_ENV):
        yield Reporter()
        return
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        yield Reporter(pipes)
