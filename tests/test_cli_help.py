"""Every `blues` subcommand's `--help` states each option's default, and every `--a_b` flag is
also spelled `--a-b` on the command line."""

from __future__ import annotations

import argparse
import importlib
import re

import pytest

from blues_train import cli
from blues_train.io import command_line
from blues_train.training import config as training_config

# blues train's parser is training_config.flag_parser, worded by TrainingConfig's fields; these
# two say what they take but not that they are off unless given (training_config.py is not ours
# to change in this round).
WORDED_ELSEWHERE = {"train": {"--resume", "--training_config"}}


def command_parser(name: str) -> argparse.ArgumentParser:
    if name == "train":
        return training_config.flag_parser("train")
    return importlib.import_module(cli.COMMANDS[name][0]).flag_parser()


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.help not in (None, argparse.SUPPRESS)
            and not isinstance(a, argparse._HelpAction)]


def rendered_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser.formatter_class(prog=parser.prog)._expand_help(action)


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_option_states_its_default(name):
    parser = command_parser(name)
    silent = []
    for action in options(parser):
        if action.nargs == 0 or action.required or action.option_strings[0] in WORDED_ELSEWHERE.get(name, ()):
            continue  # a flag, or one the user must give: no default to state
        if not re.search(r"\b(default|required)\b", rendered_help(parser, action)):
            silent.append(action.option_strings[0])
    assert not silent, f"blues {name}: --help states no default for {silent}"


def test_the_glob_default_is_in_prepares_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--help"])
    assert "(default: **/*.txt)" in capsys.readouterr().out


def sample_value(action: argparse.Action) -> list[str]:
    if action.nargs == 0:
        return []
    if action.choices:
        return [str(list(action.choices)[-1])]
    for candidate in ("3", "0.5", "some_value"):  # the first the option's type takes
        try:
            (action.type or str)(candidate)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            continue
        return [candidate]
    raise AssertionError(f"no sample value for {action.option_strings[0]}")


def required_args(parser: argparse.ArgumentParser) -> list[str]:
    argv = []
    for action in parser._actions:
        if action.required and action.option_strings:
            argv += [action.option_strings[0], *sample_value(action)]
        elif not action.option_strings:
            argv += ["positional"]
    groups = [g for g in parser._mutually_exclusive_groups if g.required]
    for group in groups:
        first = group._group_actions[0]
        argv += [first.option_strings[0], *sample_value(first)]
    return argv


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_hyphen_spellings_parse_identically(name):
    parser = command_parser(name)
    for action in options(parser):
        flag = next((s for s in action.option_strings if "_" in s), None)
        if flag is None or any(action in g._group_actions for g in parser._mutually_exclusive_groups):
            continue
        value = sample_value(action)
        underscore = required_args(parser) + [flag, *value]
        hyphen = required_args(parser) + ["--" + flag[2:].replace("_", "-"), *value]
        assert parser.parse_args(command_line.underscored(hyphen)) == parser.parse_args(underscore), flag
        with_equals = required_args(parser) + ["--" + flag[2:].replace("_", "-") + "=" + value[0]] if value else None
        if with_equals:
            assert parser.parse_args(command_line.underscored(with_equals)) == parser.parse_args(underscore), flag


def test_underscored_keeps_values_and_what_follows_a_double_dash():
    argv = ["--text-field", "my-field", "--prompt=--not-a-flag", "--", "--eval-text"]
    assert command_line.underscored(argv) == ["--text_field", "my-field", "--prompt=--not-a-flag", "--", "--eval-text"]


def test_a_hyphen_spelling_runs_through_blues(tmp_path, capsys):
    assert cli.main(["sample-corpus", "--out", str(tmp_path / "corpus"), "--max-mb", "0.01"]) == 0
    assert "code:" in capsys.readouterr().out
