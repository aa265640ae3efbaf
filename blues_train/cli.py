"""`blues <command> ARGS`: one console script for every step of the platform.

Each command lives in the module that owns it and exposes `main(argv) -> int`, so
`blues train ...` and `python -m blues_train.training.train ...` run the same code.
"""

from __future__ import annotations

import importlib
import sys

from blues_train.io.command_line import run_command, underscored

COMMANDS = {
    "prepare": ("blues_train.data.prepare", "tokenize raw corpora into a token store (data.py)"),
    "dedup": ("blues_train.mixture.dedup", "find exact and near-duplicate documents across token stores"),
    "merge": ("blues_train.mixture.merge", "blend token stores into a mixture (merge_data.py)"),
    "verify": ("blues_train.mixture.verify", "check token stores and mixtures, print statistics"),
    "train": ("blues_train.training.train", "train a Blues model with DeepSpeed (train.py)"),
    "generate": ("blues_train.serving.generate", "sample text or measure perplexity (generate.py)"),
    "export": ("blues_train.serving.export", "write a checkpoint as a Hugging Face folder (transformers, vLLM)"),
    "eval": ("blues_train.serving.evaluation", "score a checkpoint on lm-evaluation-harness tasks"),
    "eval-tasks": ("blues_train.serving.eval_tasks", "write offline harness tasks from a mixture's held-out documents"),
    "lineage": ("blues_train.serving.lineage", "the documents of a training step, its spikes, a document's steps"),
    "sample-corpus": ("blues_train.data.sample_corpus", "write the offline sample corpus"),
}


def usage() -> str:
    lines = ["usage: blues <command> [args]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


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
