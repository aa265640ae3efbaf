"""What every `blues` command shares: flags whose help states their defaults, `--a-b` spellings,
progress bars for a person watching, and errors as one line (`run_command`)."""

from __future__ import annotations

import argparse
import sys

from blues_train.io import storage
from blues_train.io.atomic import os_error
from blues_train.io.errors import BluesError


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
