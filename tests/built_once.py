"""Expensive session results (stores, mixture, training runs) built once per test run, also
under pytest-xdist.

Each xdist worker has a session of its own, so a plain session fixture would be built once
per worker. `built_once` builds it in the folder the workers share, under a file lock: the
first worker that needs it builds it, the others wait for it and reuse it. Without xdist
that folder is the session's own. What is built this way is read, never changed, by tests.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from filelock import FileLock


def run_folder(tmp_path_factory) -> Path:
    """The temporary folder of the whole run: under xdist each worker's is a folder in it."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build) -> tuple[Path, object]:
    """The folder `name` and what `build(folder)` returned for it (kept as JSON), `build`
    called by the first worker of the run that asks; `folder` does not exist before."""
    shared = run_folder(tmp_path_factory) / "built_once"
    shared.mkdir(exist_ok=True)
    folder, result = shared / name, shared / f"{name}.json"
    with FileLock(shared / f"{name}.lock"):
        if not result.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker whose build failed left
            result.write_text(json.dumps(build(folder)))
    return folder, json.loads(result.read_text())
