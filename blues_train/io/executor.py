"""Where independent work items run: `local` processes on this machine, or a `ray` cluster.

`prepare`, `verify` and `dedup` cut their work into items whose results do not depend on
which process ran them, and hand a function and the items' arguments to an executor (or, to mix kinds of work in one
run, (function, arguments) pairs: `run_tasks`); the executor returns each item's result as it
finishes (any order), and the caller puts them in
order. `local` with one worker runs the items on the calling thread; with more, in processes
forked from this one (each dies with it). `ray` submits each item as a Ray task: without an
address it starts a Ray instance on this machine, with `auto` or `ray://host:port` it joins a
cluster; a task whose worker dies (a node lost, a process killed) runs again, up to
TASK_RETRIES times. An exception raised inside a task (a Blues error naming a file and line)
comes back as itself. Ray is imported only here, and only for `ray`.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from blues_train.io.errors import BluesError, require_extra

EXECUTORS = ("local", "ray")
TASK_RETRIES = 3


def add_flags(parser, what: str) -> None:
    """`--executor` and `--ray_address` on a command whose `what` runs through an executor."""
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help=f"where {what} runs: local processes, or Ray tasks (pip install 'blues[ray]')")
    parser.add_argument("--ray_address", default=None, metavar="ADDRESS",
                        help="with --executor ray: auto or ray://host:port joins that cluster "
                             "(default: start a Ray instance on this machine)")


def make_executor(name: str = "local", workers: int | None = None, ray_address: str | None = None):
    """The executor `name` (`local` needs `workers`; `ray` runs at most `workers` tasks at once
    when given, else as many as the cluster takes)."""
    if name == "local":
        if ray_address is not None:
            raise BluesError("--ray_address is for --executor ray; add --executor ray or drop it")
        return LocalExecutor(workers or 1)
    if name == "ray":
        return RayExecutor(ray_address, workers)
    raise BluesError(f"unknown --executor {name!r}: use one of {', '.join(EXECUTORS)}")


class LocalExecutor:
    name = "local"

    def __init__(self, workers: int):
        if workers < 1:
            raise BluesError(f"--workers must be a positive integer, got {workers}")
        self.workers = workers

    def run(self, function, arguments: list[tuple]):
        """(position in `arguments`, function(*its arguments)) for each, as they finish."""
        return self.run_tasks([(function, args) for args in arguments])

    def run_tasks(self, tasks: list[tuple]):
        """(position in `tasks`, function(*arguments)) for each (function, arguments), as they finish."""
        if self.workers == 1 or len(tasks) < 2:
            for position, (function, args) in enumerate(tasks):
                yield position, function(*args)
            return
        pool = ProcessPoolExecutor(min(self.workers, len(tasks)), initializer=die_with_parent,
                                   mp_context=multiprocessing.get_context("fork"))
        try:
            futures = {pool.submit(function, *args): position for position, (function, args) in enumerate(tasks)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=futures.get):
                    yield futures[future], future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None, workers: int | None):
        self.ray = require_extra("ray", "ray", "--executor ray")
        if workers is not None and workers < 1:
            raise BluesError(f"--workers must be a positive integer, got {workers}")
        self.workers = workers
        if not self.ray.is_initialized():
            try:
                self.ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                              logging_level="error")
            except (ConnectionError, ValueError, RuntimeError) as exc:
                where = address or "a new local instance"
                raise BluesError(f"--ray_address {where}: cannot connect to Ray ({str(exc).splitlines()[0]}); "
                                 "start the cluster (`ray start --head`) or check the address") from None

    def run(self, function, arguments: list[tuple]):
        return self.run_tasks([(function, args) for args in arguments])

    def run_tasks(self, tasks: list[tuple]):
        remotes = {}
        limit = self.workers or len(tasks)
        waiting = list(enumerate(tasks))[::-1]
        running = {}
        while waiting or running:
            while waiting and len(running) < limit:
                position, (function, args) = waiting.pop()
                if function not in remotes:
                    remotes[function] = self.ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(function)
                running[remotes[function].remote(*args)] = position, function
            done, _ = self.ray.wait(list(running), num_returns=1)
            position, function = running.pop(done[0])
            yield position, self._result(done[0], function)

    def _result(self, ref, function):
        exceptions = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        except (exceptions.WorkerCrashedError, exceptions.NodeDiedError, exceptions.ObjectLostError) as exc:
            raise BluesError(f"Ray task {function.__name__} failed {TASK_RETRIES + 1} times, its worker or "
                             f"node lost each time ({type(exc).__name__}); check the cluster and run the "
                             "same command again (it resumes)") from None


def die_with_parent() -> None:
    """Linux: a worker process is terminated when its parent dies, even by SIGKILL (no orphans)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
