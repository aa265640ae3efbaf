"""`make dev`: run `dagster dev ARGS` with the default handling of SIGINT and SIGTERM.

    python -m pipelines.dev -w workspace.yaml -h 127.0.0.1 -p 3000

A background job of a non-interactive shell (`make dev &` in a script, CI) starts with
SIGINT ignored, and an ignored signal stays ignored across exec. dagster dev gives SIGTERM
the handler SIGINT has (so SIGTERM is ignored too) and stops its webserver, daemon and code
server with SIGINT, which they inherited ignored: nothing would ever stop.

`dagster dev` warns at every start that `dg dev` supersedes it. `dg dev` serves the same UI
(README), but `make dev` keeps `dagster dev`'s flags (-w, -h, -p), so the warning is silenced.
Its services log at `--log-level warning` unless ARGS set one: at `info` the daemon writes a
line per sensor and schedule tick; the UI's address is printed here instead.
"""

import os
import signal
import sys

# `python -m dagster dev ARGS` without the SupersessionWarning (argv[0] is the module's path)
DAGSTER_DEV = ("import runpy, warnings, dagster; "
               "warnings.filterwarnings('ignore', category=dagster.SupersessionWarning); "
               "runpy.run_module('dagster', run_name='__main__', alter_sys=True)")


def main(argv: list[str]) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    if not any(arg.startswith("--log-level") for arg in argv):
        argv = ["--log-level", "warning", *argv]
    print(f"dagster dev: the UI at http://{option(argv, '-h', '--host', '127.0.0.1')}:"
          f"{option(argv, '-p', '--port', '3000')} once it has started", flush=True)
    os.execv(sys.executable, [sys.executable, "-c", DAGSTER_DEV, "dev", *argv])


def option(argv: list[str], short: str, long: str, default: str) -> str:
    """The value `argv` gives the option `short`/`long` (as `-p 3001`, `--port 3001`, `--port=3001`)."""
    for i, arg in enumerate(argv):
        if arg in (short, long) and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(long + "="):
            return arg.split("=", 1)[1]
    return default


if __name__ == "__main__":
    main(sys.argv[1:])
