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
end), off the training step's path. A run that ends by an exception is ended FAILED, one
interrupted (Ctrl-C, SIGTERM) KILLED; its resume sets it RUNNING again (the steps after the
last checkpoint are then logged twice, as metrics.jsonl keeps only the resume's). `blues
eval` of a checkpoint of a tracked run logs its scores into the same MLflow run
(`log_evaluation`). With `--tracking off`, or `auto` and no MLFLOW_TRACKING_URI, nothing is
sent anywhere.

Needs the `tracking` extra: pip install 'blues[tracking]'.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
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


class Terminated(SystemExit):
    """SIGTERM, raised in the main thread while a tracked run trains, so that the run unwinds
    and ends its MLflow run KILLED; the process exits 143, as SIGTERM's default would."""

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)


class Off:
    """No tracking: every hook does nothing."""

    @contextmanager
    def ending(self):
        yield

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

    @contextmanager
    def ending(self):
        """The training loop's span: the run ends FINISHED after it, FAILED when it raises,
        KILLED when interrupted (KeyboardInterrupt, or SIGTERM raised as Terminated)."""
        terminate = signal.getsignal(signal.SIGTERM)
        main = threading.current_thread() is threading.main_thread()
        if main:
            signal.signal(signal.SIGTERM, raise_terminated)
        try:
            yield
        except BaseException as exc:
            self.end_abnormally("KILLED" if isinstance(exc, (KeyboardInterrupt, Terminated)) else "FAILED")
            raise
        finally:
            if main:
                signal.signal(signal.SIGTERM, terminate)
        self.finish()

    def end_abnormally(self, status: str) -> None:
        """End the run `status` on the way out of an error: a failure to reach the server
        is said, never raised over the error that ends the run."""
        try:
            self.finish(status)
            print(f"mlflow: run {self.run_id} ended {status}", file=sys.stderr, flush=True)
        except BluesError as exc:
            print(f"mlflow: could not end run {self.run_id} {status}: {exc}", file=sys.stderr, flush=True)

    def finish(self, status: str = "FINISHED") -> None:
        import mlflow

        with server_errors(self.uri):
            mlflow.flush_async_logging()
            self.client.set_terminated(self.run_id, status)


def raise_terminated(signum, frame):
    raise Terminated()


def log_evaluation(checkpoint_folder: Path, step: int, scores: dict[str, float]) -> str | None:
    """`blues eval`'s scores of a checkpoint (`task/metric`: value) as metrics
    `lm_eval/<task>/<metric>` at the checkpoint's step, in the MLflow run of its run folder
    (OUT/checkpoints/step-N, OUT/mlflow_run.json). Returns the run's link (`run_link`), or
    None when the checkpoint's run was not tracked (nothing is sent)."""
    out = Path(checkpoint_folder).resolve().parent.parent
    if Path(checkpoint_folder).resolve().parent.name != "checkpoints" or not (out / RUN_FILE).is_file():
        return None
    require_extra("mlflow", "tracking", "logging the scores of a checkpoint whose run was tracked with MLflow")
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from blues_train.io.settings import read_json

    uri = str(read_json(str(out / RUN_FILE), "the MLflow run file").get("tracking_uri", ""))
    run_id = read_run_id(out / RUN_FILE)
    now = int(time.time() * 1000)
    with server_errors(uri):
        MlflowClient(uri).log_batch(run_id, metrics=[Metric(f"lm_eval/{name}", value, now, step)
                                                     for name, value in sorted(scores.items())])
    return run_link(out)


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
