"""`blues <command> ARGS`: one console script for every step of the platform.

Each command lives in the module that owns it and exposes `main(argv) -> int`, so
`blues train ...` and `python -m blues_train.train ...` run the same code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from blues_train import storage
from blues_train.atomic import os_error
from blues_train.errors import BluesError

COMMANDS = {
    "prepare": ("blues_train.prepare", "tokenize raw corpora into a token store (data.py)"),
    "dedup": ("blues_train.dedup", "find exact and near-duplicate documents across token stores"),
    "merge": ("blues_train.merge", "blend token stores into a mixture (merge_data.py)"),
    "verify": ("blues_train.verify", "check token stores and mixtures, print statistics"),
    "train": ("blues_train.train", "train a Blues model with DeepSpeed (train.py)"),
    "generate": ("blues_train.generate", "sample text or measure perplexity (generate.py)"),
    "export": ("blues_train.export", "write a checkpoint as a Hugging Face folder (transformers, vLLM)"),
    "lineage": ("blues_train.lineage", "the documents of a training step, its spikes, a document's steps"),
    "sample-corpus": ("blues_train.sample_corpus", "write the offline sample corpus"),
}


def usage() -> str:
    lines = ["usage: blues <command> [args]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` ends each option's line with `(default: X)`, unless its help words the
    default itself or there is none to state (a flag, a required or unset option)."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or _states_nothing(action.default):
            return action.help
        return super()._get_help_string(action)


def _states_nothing(default) -> bool:
    return default is None or default is False or default is argparse.SUPPRESS or default in ([], "")


def flag_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser every command builds its flags on: each `--help` line states its default."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=DefaultsHelpFormatter)


def progress(items, description: str, enabled: bool, total: int | None = None, unit: str = "it"):
    """`items`, with a tqdm bar on stderr while a person watches (`enabled`, and stderr a
    terminal); stdout, which scripts parse, never changes."""
    if not (enabled and sys.stderr.isatty()):
        return items
    from tqdm import tqdm

    return tqdm(items, desc=description, total=total, unit=unit, file=sys.stderr, leave=False)


def underscored(argv: list[str]) -> list[str]:
    """`--text-field` spelled as its flag, `--text_field` (values and what follows `--` kept)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            out[i] = "--" + name[2:].replace("-", "_") + eq + value
    return out


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
    return run_command(module.main, underscored(rest))


if __name__ == "__main__":
    sys.exit(main())
