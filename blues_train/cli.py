"""`blues <command> ARGS`: one console script for every step of the platform.

Each command lives in the module that owns it and exposes `main(argv) -> int`, so
`blues train ...` and `python -m blues_train.train ...` run the same code.
"""

from __future__ import annotations

import importlib
import sys

from blues_train import storage
from blues_train.atomic import os_error
from blues_train.errors import BluesError

COMMANDS = {
    "prepare": ("blues_train.prepare", "tokenize raw corpora into a token store (data.py)"),
    "merge": ("blues_train.merge", "blend token stores into a mixture (merge_data.py)"),
    "verify": ("blues_train.verify", "check token stores and mixtures, print statistics"),
    "train": ("blues_train.train", "train a Blues model with DeepSpeed (train.py)"),
    "generate": ("blues_train.generate", "sample text or measure perplexity (generate.py)"),
    "export": ("blues_train.export", "write a checkpoint as a Hugging Face folder (transformers, vLLM)"),
    "eval": ("blues_train.evaluation", "score a checkpoint on lm-evaluation-harness tasks"),
    "eval-tasks": ("blues_train.eval_tasks", "write offline harness tasks from a mixture's held-out documents"),
    "lineage": ("blues_train.lineage", "the documents of a training step, its spikes, a document's steps"),
    "sample-corpus": ("blues_train.sample_corpus", "write the offline sample corpus"),
}


def usage() -> str:
    lines = ["usage: blues <command> [args]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def run_command(main_fn, argv: list[str]) -> int:
    """Run a command's main, turning a BluesError (or an operating system error) into a
    one-line message and exit 2."""
    try:
        return int(main_fn(argv) or 0)
    except BluesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # one the command did not word itself: still one line
        print(f"error: {os_error(exc, exc.filename or 'a file', 'accessing')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an object store's failure no call site worded: still one line
        error = storage.user_error(exc, None) if storage.is_storage_exception(exc) else None
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return run_command(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
