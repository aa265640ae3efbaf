"""The training throughput cost of MLflow tracking (`blues train --tracking mlflow`).

One invocation trains the same tiny run (the sample corpus' mixture, one CPU rank) with
`--tracking off` and `--tracking mlflow` alternately, `--rounds` times each, against a local
`mlflow server` (SQLite backend store, started here) on 127.0.0.1. Reported:
(a) steps/s of the training loop, from the first step to the end of the last, best and
    median per mode, and their ratio;
(b) the time the tracking hook itself takes on the step path (`MlflowRun.log_step`: the
    metrics handed to MLflow's asynchronous queue) per step, against the mean step time.

    .venv/bin/python benchmarks/tracking_overhead.py [--steps 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from blues_train.data.prepare import prepare_dataset
from blues_train.data.sample_corpus import write_sample_corpus
from blues_train.mixture.merge import merge
from blues_train.training import tracking, train


def build_mixture(work: Path) -> Path:
    corpus = write_sample_corpus(work / "corpus", max_mb=0.5)
    stores = [work / name for name in ("code", "prose")]
    for name, out in zip(("code", "prose"), stores):
        prepare_dataset(corpus[name], out, workers=1, progress=False)
    merge(stores, work / "mixture", val_fraction=0.05)
    return work / "mixture"


def start_server(work: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
         f"sqlite:///{work / 'mlflow.db'}", "--default-artifact-root", (work / "artifacts").as_uri(),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5):
                return server, uri
        except OSError:
            time.sleep(1)
    raise SystemExit("mlflow server did not start")


class LoopClock:
    """Times the training loop (first step to the end of the last) and the tracking hook."""

    def __init__(self):
        self.first = self.last = None
        self.hook_seconds = 0.0
        self.steps = 0

    def install(self):
        original_log_step, original_step_record = tracking.MlflowRun.log_step, train.step_record
        clock = self

        def step_record(*args, **kwargs):
            record = original_step_record(*args, **kwargs)
            clock.steps += 1
            clock.first = clock.first or kwargs["started"]
            return record

        def log_step(self_, record):
            started = time.perf_counter()
            original_log_step(self_, record)
            clock.hook_seconds += time.perf_counter() - started

        train.step_record, tracking.MlflowRun.log_step = step_record, log_step


def one_run(mixture: Path, out: Path, steps: int, mode: str) -> LoopClock:
    clock = LoopClock()
    clock.install()
    args = ["--data_cache_dir", str(mixture), "--out", str(out), "--model", "tiny", "--max_steps", str(steps),
            "--seq_len", "32", "--global_batch_tokens", "256", "--micro_batch", "8", "--eval_interval", "1000",
            "--save_interval", "100000", "--tracking", mode]
    train.main(args)
    clock.last = time.perf_counter()
    return clock


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        mixture = build_mixture(work)
        server, uri = start_server(work)
        os.environ["MLFLOW_TRACKING_URI"] = uri
        try:
            rates = {"off": [], "mlflow": []}
            hook = []
            for r in range(args.rounds):
                for mode in ("off", "mlflow"):
                    clock = one_run(mixture, work / f"run-{mode}-{r}", args.steps, mode)
                    # the last step's end is after save and finish: a few ms; counted for both modes
                    rates[mode].append((clock.steps - 1) / (clock.last - clock.first))
                    if mode == "mlflow":
                        hook.append(clock.hook_seconds / clock.steps)
        finally:
            os.killpg(server.pid, 15)
            server.wait()
    for mode, values in rates.items():
        print(f"{mode:>7}: {max(values):.2f} steps/s best, {statistics.median(values):.2f} median "
              f"({', '.join(f'{v:.2f}' for v in values)})")
    best = max(rates["mlflow"]) / max(rates["off"])
    median = statistics.median(rates["mlflow"]) / statistics.median(rates["off"])
    step_ms = 1000 / statistics.median(rates["off"])
    print(f"mlflow / off: {best:.3f} (best), {median:.3f} (median); tracking hook {1000 * statistics.median(hook):.2f} "
          f"ms per step of {step_ms:.1f} ms ({100 * statistics.median(hook) * 1000 / step_ms:.2f}%)")


if __name__ == "__main__":
    main()
