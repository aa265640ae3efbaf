"""MLflow tracking of a training run: `blues train --tracking mlflow` (or MLFLOW_TRACKING_URI set).

Rank 0 logs to the MLflow tracking server of MLFLOW_TRACKING_URI (default: MLflow's own,
./mlruns), in experiment MLFLOW_EXPERIMENT_NAME (default `blues`), a run named after --out:
    parameters   every TrainingConfig field (seq_len resolved)
    tags         blues.mixture_fingerprint, blues.store.<i>.fingerprint and .path, blues.out,
                 and per checkpoint checkpoint.step-N.path and checkpoint.step-N.sha256 (weights)
    metrics      every step's figures as metrics.jsonl has them (metrics.scalars: loss, lr,
                 grad_norm, tokens_per_s, mfu on a GPU, val_loss, val_perplexity, and
                 experts/layer<N>/max_load, ...), at their step
The run's id is kept in OUT/mlflow_run.json, so a resumed run (--resume) continues the same
MLflow run; a changed setting is then tagged `resumed_at.step-N.<field>`, as MLflow
parameters cannot change. Metrics are sent asynchronously (MLflow's queue, flushed at the
end), off the training step's path. With `--tracking off`, or `auto` and no
MLFLOW_TRACKING_URI, nothing is sent anywhere.

Needs the `tracking` extra: pip install 'blues[tracking]'.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

from blues_train.io import storage
from blues_train.io.atomic import write_json_atomic
from blues_train.io.errors import BluesError, require_extra

RUN_FILE = "mlflow_run.json"
DEFAULT_EXPERIMENT = "blues"


def enabled(setting: str) -> bool:
    """--tracking: mlflow, off, or auto (mlflow when MLFLOW_TRACKING_URI is set)."""
    return setting == "mlflow" or (setting == "auto" and bool(os.environ.get("MLFLOW_TRACKING_URI")))


class Off:
    """No tracking: every hook does nothing."""

    def log_step(self, record: dict) -> None:
        pass

    def log_checkpoint(self, folder: Path, weights_sha256: str) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MlflowRun(Off):
    """Rank 0's MLflow run of a training run (OUT/mlflow_run.json names it)."""

    def __init__(self, cfg, mixture: dict, start_step: int):
        require_extra("mlflow", "tracking", "--tracking mlflow")
        from mlflow import MlflowClient

        self.client = MlflowClient()
        self.uri = self.client.tracking_uri
        self.out = Path(cfg.out)
        with server_errors(self.uri):
            self.run_id = self.resumed(start_step) or self.created(cfg, mixture)
            self.log_settings(cfg, start_step)
        print(f"mlflow: run {self.run_id} at {self.uri}", flush=True)

    def resumed(self, start_step: int) -> str | None:
        """The run of OUT/mlflow_run.json, reopened, when this start resumes a run that has one."""
        path = self.out / RUN_FILE
        if not start_step or not path.is_file():
            return None
        run_id = read_run_id(path)
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def created(self, cfg, mixture: dict) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        tags = {"blues.mixture_fingerprint": mixture["fingerprint"], "blues.out": str(self.out.resolve())}
        for i, source in enumerate(mixture["sources"]):
            tags[f"blues.store.{i}.fingerprint"] = source["fingerprint"]
            tags[f"blues.store.{i}.path"] = storage.display(source["path"])
        run = self.client.create_run(experiment_id, tags=tags, run_name=self.out.resolve().name)
        write_json_atomic(self.out / RUN_FILE, {"tracking_uri": self.uri, "experiment_id": experiment_id,
                                                "run_id": run.info.run_id})
        return run.info.run_id

    def log_settings(self, cfg, start_step: int) -> None:
        """Every setting as a parameter; one a resumed run changed, as a tag."""
        from mlflow.entities import Param, RunTag

        logged = self.client.get_run(self.run_id).data.params
        settings = {key: str(value) for key, value in cfg.model_dump().items()}
        new = [Param(k, v) for k, v in settings.items() if k not in logged]
        changed = [RunTag(f"resumed_at.step-{start_step}.{k}", v) for k, v in settings.items()
                   if k in logged and logged[k] != v]
        self.client.log_batch(self.run_id, params=new, tags=changed)

    def log_step(self, record: dict) -> None:
        from mlflow.entities import Metric

        from blues_train.training.metrics import scalars

        now = int(time.time() * 1000)
        figures = [Metric(key, float(value), now, record["step"]) for key, value in scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=figures, synchronous=False)

    def log_checkpoint(self, folder: Path, weights_sha256: str) -> None:
        with server_errors(self.uri):
            self.client.set_tag(self.run_id, f"checkpoint.{folder.name}.path", str(folder.resolve()))
            self.client.set_tag(self.run_id, f"checkpoint.{folder.name}.sha256", weights_sha256)

    def finish(self, status: str = "FINISHED") -> None:
        import mlflow

        with server_errors(self.uri):
            mlflow.flush_async_logging()
            self.client.set_terminated(self.run_id, status)


def read_run_id(path: Path) -> str:
    from blues_train.io.settings import read_json

    run_id = read_json(str(path), "the MLflow run file").get("run_id")
    if not isinstance(run_id, str):
        raise BluesError(f"{path}: has no run_id; delete it to track the resumed run as a new MLflow run")
    return run_id


@contextmanager
def server_errors(uri: str):
    """The tracking server's failures (unreachable, a run it does not know) as one line."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BluesError(f"--tracking mlflow: the tracking server {uri} failed ({first[:300]}); "
                         "check MLFLOW_TRACKING_URI and that the server runs") from None


def run_link(out) -> str | None:
    """Where the MLflow run of run folder `out` is seen: its page on an http(s) tracking
    server, else `URI run RUN_ID`; None for an untracked run."""
    path = Path(out) / RUN_FILE
    if not path.is_file():
        return None
    from blues_train.io.settings import read_json

    run = read_json(str(path), "the MLflow run file")
    uri = str(run.get("tracking_uri", ""))
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{run.get('experiment_id')}/runs/{run.get('run_id')}"
    return f"{uri} run {run.get('run_id')}"


def tracker(cfg, mixture: dict, start_step: int, rank: int) -> Off:
    """Rank 0's MLflow run when tracking is on; otherwise (and on other ranks) Off."""
    if rank != 0 or not enabled(cfg.tracking):
        return Off()
    return MlflowRun(cfg, mixture, start_step)
