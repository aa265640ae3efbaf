"""`blues eval-tasks`: offline lm-evaluation-harness tasks built from a mixture's held-out documents.

    blues eval-tasks --mixture data_cache/merged --out eval_tasks
    blues eval --checkpoint runs/demo --tasks blues_cloze,blues_next_passage --include_path eval_tasks

Every document the mixture holds out for validation (never trained on) can become an item:
    blues_cloze          the last word of a passage, given the passage before it (as LAMBADA):
                         acc = the word is the model's greedy continuation, and perplexity
    blues_next_passage   which of 4 passages continues the given one: the true continuation
                         or one from another held-out document (acc, acc_norm)
OUT gets one task YAML and one JSON-lines data file per task (`dataset_path: json`, the
data file by its absolute path), so the harness reads them with --include_path and no
network. A task the held-out documents are too few for is skipped (and said so). Items are drawn with --seed; the same mixture and seed give the same files.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from blues_train.data import store, tokenizer
from blues_train.io import command_line, storage
from blues_train.io.atomic import check_output_folder, write_atomic
from blues_train.io.errors import BluesError
from blues_train.mixture.loader import DOCUMENT, chunk_tokens, split_documents
from blues_train.mixture.mixture_chunks import MixtureChunks
from blues_train.mixture.spec import read_mixture

CLOZE = "blues_cloze"
NEXT_PASSAGE = "blues_next_passage"
PASSAGE_TOKENS = 96  # tokens of context in an item: short enough for small models' windows
CHOICES = 4
LAST_WORD = re.compile(r"^(.*\S)\s+(\w+)\W*$", re.S)  # a passage, then its last word


def held_out_texts(mixture_dir) -> list[str]:
    """The text of every held-out document of the mixture, in store, chunk and row order."""
    mixture = read_mixture(mixture_dir)
    chunks = MixtureChunks.of(mixture)
    documents = split_documents(mixture, chunks, None, "val")
    texts = []
    for chunk in np.unique(documents[:, DOCUMENT["chunk"]]).tolist():
        tokens = chunk_tokens(store.read_chunk(chunks.paths[chunk]))
        mine = documents[documents[:, DOCUMENT["chunk"]] == chunk]
        texts += [tokenizer.decode(tokens[start:start + length].tolist())
                  for start, length in zip(mine[:, DOCUMENT["start"]], mine[:, DOCUMENT["length"]])]
    return texts


def passage(text: str, start: int = 0) -> str:
    """At most PASSAGE_TOKENS tokens of `text` from token `start`, cut back to a whole word."""
    ids = tokenizer.encode(text)[start:start + PASSAGE_TOKENS]
    piece = tokenizer.decode(ids)
    return piece if len(ids) < PASSAGE_TOKENS else piece.rsplit(" ", 1)[0]


def cloze_items(texts: list[str]) -> list[dict]:
    """{context, target}: a passage without its last word, and that word after a space."""
    items = []
    for text in texts:
        match = LAST_WORD.match(passage(text.strip()))
        if match:
            items.append({"context": match.group(1), "target": " " + match.group(2)})
    return items


def next_passage_items(texts: list[str], rng: np.random.Generator) -> list[dict]:
    """{context, choices, label}: a document's first passage, its true continuation among
    CHOICES - 1 continuations of other documents, at a random place."""
    pairs = []
    for text in texts:
        text = text.strip()
        ids = tokenizer.encode(text)
        cut = tokenizer.decode(ids[:min(len(ids) // 2, PASSAGE_TOKENS)]).rfind(" ")
        if cut > 0 and text[cut + 1:].strip():
            pairs.append((text[:cut], " " + passage(text[cut + 1:])))
    if len(pairs) < CHOICES:
        return []
    items = []
    for i, (context, continuation) in enumerate(pairs):
        others = rng.choice([j for j in range(len(pairs)) if j != i], CHOICES - 1, replace=False)
        choices = [pairs[j][1] for j in others]
        label = int(rng.integers(CHOICES))
        choices.insert(label, continuation)
        items.append({"context": context, "choices": choices, "label": label})
    return items


def task_yaml(name: str, data_file: Path) -> str:
    """The harness task of `name`, reading `data_file` as its test split."""
    common = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data_file))}\n"
              "test_split: test\ndoc_to_text: \"{{context}}\"\n")
    if name == CLOZE:
        return common + ("output_type: loglikelihood\ndoc_to_target: \"{{target}}\"\nmetric_list:\n"
                         "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
                         "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                         "metadata:\n  version: 1.0\n")
    return common + ("output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
                     "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                     "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
                     "metadata:\n  version: 1.0\n")


def write_tasks(mixture_dir, out, seed: int = 0) -> dict[str, int]:
    """Write into folder `out` every task the held-out documents give items for; {task name: items}."""
    texts = held_out_texts(mixture_dir)
    tasks = {CLOZE: cloze_items(texts), NEXT_PASSAGE: next_passage_items(texts, np.random.default_rng(seed))}
    tasks = {name: items for name, items in tasks.items() if items}
    if not tasks:
        raise BluesError(f"--mixture {mixture_dir}: its {len(texts)} held-out documents give no task items; "
                         "merge with a larger --val_fraction")
    out = Path(out).resolve()
    for name, items in tasks.items():
        data_file = out / f"{name}.jsonl"
        write_atomic(data_file, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items).encode())
        write_atomic(out / f"{name}.yaml", task_yaml(name, data_file).encode())
    return {name: len(items) for name, items in tasks.items()}


def flag_parser() -> argparse.ArgumentParser:
    p = command_line.flag_parser("blues eval-tasks", __doc__.split("\n")[0])
    p.add_argument("--mixture", required=True, help="mixture folder (blues merge output)")
    p.add_argument("--out", required=True, help="folder for the task YAMLs and data (blues eval --include_path)")
    p.add_argument("--seed", type=int, default=0, help="draws the multiple-choice distractors and order")
    return p


def parse_args(argv):
    return flag_parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if storage.is_remote(args.out):
        raise BluesError(f"--out {args.out}: task folders are local (the harness reads them from disk)")
    check_output_folder(args.out, "--out")
    written = write_tasks(args.mixture, args.out, args.seed)
    for name in (CLOZE, NEXT_PASSAGE):
        if name in written:
            print(f"{name}: {written[name]} items -> {Path(args.out) / (name + '.yaml')}")
        else:
            print(f"{name}: skipped, too few held-out documents (merge with a larger --val_fraction)")
    return 0


if __name__ == "__main__":
    from blues_train.io.command_line import run_command

    sys.exit(run_command(main, sys.argv[1:]))
