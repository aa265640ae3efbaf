"""Is one tokenizer used end to end? The mixture, every token store in it and the model
that trains on it must agree with the tokenizer shipped here (the one generation decodes
with): same vocabulary hash, size and end-of-text id, and a model vocabulary that holds
every id."""

from __future__ import annotations

from blues_model import BluesConfig
from blues_train.data import store
from blues_train.data.tokenizer import N_VOCAB, tokenizer_mismatch
from blues_train.io import storage
from blues_train.io.errors import BluesError
from blues_train.mixture.spec import MIXTURE_FILE, read_mixture


def tokenizer_problems(mixture_dir, model: str | None = None) -> list[str]:
    """One line per file that disagrees, naming it; empty when all agree.

    `model`: a `blues train --model` value (preset or JSON file) to check the vocabulary of.
    """
    try:
        mixture = read_mixture(mixture_dir)
    except BluesError as exc:
        return [str(exc)]
    problems: list[str] = []
    recorded = [(storage.path(mixture_dir) / MIXTURE_FILE, mixture["tokenizer"])]
    for source in mixture["sources"]:
        try:
            info = store.read_manifest(source["path"])["tokenizer"]
        except BluesError as exc:
            problems.append(str(exc))
        else:
            recorded.append((storage.path(source["path"]) / store.MANIFEST, info))
    for file, info in recorded:
        mismatch = tokenizer_mismatch(info)
        if mismatch:
            problems.append(f"{file}: {mismatch}; prepare and merge again")
    if model is not None:
        try:
            vocab = BluesConfig.resolve(model).vocab_size
        except (ValueError, TypeError) as exc:
            return [*problems, f"model {model}: {exc}"]
        if vocab < N_VOCAB:
            problems.append(f"model {model}: vocab_size {vocab} cannot embed the tokenizer's {N_VOCAB} ids")
    return problems
