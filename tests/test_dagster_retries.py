"""A training run killed mid-way (SIGKILL: a lost node, the OOM killer) continues from its
last checkpoint, in the same run folder, whether trained_model's RetryPolicy retries it or
the failed run is re-executed (what the UI's "Re-execute from failure" does): its losses
are those of an uninterrupted run, and every checkpoint joins one model_checkpoint history."""

import json
import threading
import time
from pathlib import Path

import dagster as dg
import psutil  # installed with deepspeed
import pytest
from test_pipelines import EVERYTHING, metadata, resources
from training_runs import LR, MODEL, STEPS, assert_close
from training_runs import losses as reference_losses

from pipelines import assets
from pipelines.config import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore::dagster.PreviewWarning")
SAVE_INTERVAL = 2  # a checkpoint to resume from every other step
TRAINING = dg.RunConfig({"trained_model": TrainConfig(save_interval=SAVE_INTERVAL)})
NO_STEP_RETRIES = {"execution": {"config": {"retries": {"disabled": {}}}}}


@pytest.fixture
def project(tmp_path, sample_corpus_dir, code_store, prose_store, mixture_dir, reference):
    """A project on the shared stores and mixture whose training settings are those of the
    `reference` run (training_runs.py, `blues train` uninterrupted): its losses to match."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "datasets": {"paths": [str(code_store), str(prose_store)]},
        "sources": [{"name": "code", "input": str(sample_corpus_dir / "code"), "glob": "**/*.jsonl.zst"},
                    {"name": "prose", "input": str(sample_corpus_dir / "prose"), "glob": "**/*"}],
        "mixture": {"output": str(mixture_dir), "val_fraction": 0.05},
        "training": {"model": MODEL, "out": "runs", "max_steps": STEPS, "seq_len": 32, "global_batch_tokens": 128,
                     "micro_batch": 1, "lr": LR, "eval_interval": 4, "eval_sequences": 4},
    }))
    return path, reference_losses(reference)


def train(instance, project, run_config=TRAINING, **kwargs):
    return dg.materialize(EVERYTHING, selection=[assets.trained_model], instance=instance,
                          resources=resources(project), run_config=run_config, **kwargs)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir)}


class KillAfterFirstCheckpoint(threading.Thread):
    """SIGKILL the training process (a child of this test) once a run folder under
    `runs` has its first complete checkpoint; `steps_done`: its metrics then."""

    def __init__(self, runs: Path):
        super().__init__(daemon=True)
        self.runs, self.killed, self.steps_done = runs, None, None
        self.known = set(runs.glob("run-*")) if runs.exists() else set()

    def run(self):
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            for meta in self.runs.glob(f"run-*/checkpoints/step-{SAVE_INTERVAL:06d}/meta.json"):
                run_dir = meta.parents[2]
                if run_dir in self.known:
                    continue
                for child in psutil.Process().children(recursive=True):
                    if "blues_train.training.train" in " ".join(child.cmdline()):
                        child.kill()
                        self.killed, self.steps_done = run_dir, len(records(run_dir))
                        return
            time.sleep(0.02)


def killed_run(runs: Path, launch):
    """`launch()` with the training process killed after its first checkpoint."""
    killer = KillAfterFirstCheckpoint(runs)
    killer.start()
    result = launch()
    killer.join()
    assert killer.killed is not None, "the training process was not found to kill"
    assert killer.steps_done < STEPS, "training finished before it was killed: nothing was tested"
    return result, killer.killed


def check_resumed(instance, run_dir: Path, uninterrupted: dict) -> None:
    starts = [r["step"] for r in records(run_dir) if "data" in r]
    assert len(starts) == 2 and starts[0] == 1 and starts[1] > 1, starts  # from scratch, then resumed
    assert_close(losses(run_dir), uninterrupted, range(1, STEPS + 1))
    keys = [k for k in instance.get_dynamic_partitions("checkpoints") if k.startswith(run_dir.name + "-")]
    assert keys == [f"{run_dir.name}-step-{step:06d}" for step in range(SAVE_INTERVAL, STEPS + 1, SAVE_INTERVAL)]


@pytest.mark.slow
def test_a_killed_training_is_retried_from_its_last_checkpoint(project):
    path, uninterrupted = project
    with dg.instance_for_test() as instance:
        result, run_dir = killed_run(path.parent / "runs", lambda: train(instance, path, raise_on_error=False))
        assert result.success
        events = [e.event_type_value for e in result.all_events]
        assert "STEP_UP_FOR_RETRY" in events and "STEP_RESTARTED" in events
        check_resumed(instance, run_dir, uninterrupted)
        assert metadata(result, "trained_model")["checkpoints"] == STEPS // SAVE_INTERVAL


@pytest.mark.slow
def test_a_killed_run_re_executed_from_failure_resumes(project, monkeypatch):
    path, uninterrupted = project
    monkeypatch.setenv("BLUES_CONFIG", str(path))
    run_config = {**TRAINING.to_config_dict(), **NO_STEP_RETRIES}
    job = dg.reconstructable(training_job)
    with dg.instance_for_test() as instance:
        def launch():
            with dg.execute_job(job, instance, run_config=run_config, raise_on_error=False) as result:
                return result.success, result.run_id

        (succeeded, run_id), run_dir = killed_run(path.parent / "runs", launch)
        assert not succeeded
        options = dg.ReexecutionOptions.from_failure(run_id, instance)  # the UI's "Re-execute from failure"
        with dg.execute_job(job, instance, run_config=run_config, reexecution_options=options) as again:
            assert again.success and again.dagster_run.root_run_id == run_id
        check_resumed(instance, run_dir, uninterrupted)


def training_job() -> dg.JobDefinition:
    """The job a re-execution reconstructs (dg.reconstructable): trained_model on the
    project that `$BLUES_CONFIG` names, in process, as the code location runs it."""
    from pipelines.resources import build_resources

    job = dg.define_asset_job("train", selection=[assets.trained_model])
    defs = dg.Definitions(assets=EVERYTHING, jobs=[job], resources=build_resources(), executor=dg.in_process_executor)
    return defs.resolve_job_def("train")
