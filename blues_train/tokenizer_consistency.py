"""Is one tokenizer used end to end? The mixture, every token store in it and the model
that trains on it must agree with the tokenizer shipped here (the one generation decodes
with): same vocabulary hash, size and end-of-text id, and a model vocabulary that holds
every id."""

from __future__ import annotations

from pathlib import Path

from blues_train import store
from blues_train.errors import BluesError
from blues_train.mixture import MIXTURE_FILE, read_mixture
from blues_train.tokenizer import tokenizer_info

FIELDS = ("name", "vocab_sha256", "n_vocab", "eot_id")


def tokenizer_problems(mixture_dir, model: str | None = None) -> list[str]:
    """One line per disagreement, naming the file; empty when all agree.

    `model`: a `blues train --model` value (preset or JSON file) to check the vocabulary of.
    """
    shipped = tokenizer_info()
    problems: list[str] = []

    def compare(file, recorded: dict) -> None:
        for key in FIELDS:
            if recorded.get(key) != shipped[key]:
                problems.append(f"{file}: tokenizer.{key} {recorded.get(key)!r} is not the shipped "
                                f"tokenizer's {shipped[key]!r}; prepare and merge again")

    try:
        mixture = read_mixture(mixture_dir)
    except BluesError as exc:
        return [str(exc)]
    compare(Path(mixture_dir) / MIXTURE_FILE, mixture["tokenizer"])
    for source in mixture["sources"]:
        try:
            compare(Path(source["path"]) / store.MANIFEST, store.read_manifest(source["path"])["tokenizer"])
        except BluesError as exc:
            problems.append(str(exc))
    if model is not None:
        from blues_train.train import model_config

        vocab = model_config(model, None).vocab_size
        if vocab < shipped["n_vocab"]:
            problems.append(f"model {model}: vocab_size {vocab} cannot embed the tokenizer's "
                            f"{shipped['n_vocab']} ids")
    return problems
