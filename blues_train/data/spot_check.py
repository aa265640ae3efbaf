"""The spot check: tiktoken re-encodes a deterministic sample of each chunk's documents.

A document is in the sample when a hash of its identity (source label, record number)
falls below SHARE, so about SHARE of the documents, and on average of the tokens, are
checked, the same ones whatever the engine or the worker count; a chunk in which no
document falls below it checks the one whose hash is lowest. Of a document longer than
MAX_CHARS only a prefix is checked, cut where tiktoken's own encoding provably splits (see
`prefix_end`), so one huge document does not cost a tiktoken pass over all of it. Any
difference stops the run before the chunk is written, naming the document.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from blues_train.io.errors import BluesError

SHARE = 0.01
MAX_CHARS = 1 << 16
_HASH_SPACE = 1 << 64
_LETTER_THEN_SPACE = re.compile(r"[A-Za-z](?= )")


def sample(sources: list[str], indices: list[int]) -> list[int]:
    """Positions in the chunk of the documents to check."""
    hashes = [_hash(source, index) for source, index in zip(sources, indices)]
    chosen = [i for i, value in enumerate(hashes) if value < SHARE * _HASH_SPACE]
    return chosen or [hashes.index(min(hashes))]


def _hash(source: str, index: int) -> int:
    digest = hashlib.blake2b(f"{source}\0{index}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def prefix_end(text: str, at_least: int) -> int:
    """Where to cut `text` at or after `at_least` so that tiktoken's encoding of the prefix
    is a prefix of its encoding of `text` (len(text) where there is no such place).

    The cut goes between an ASCII letter and a space. No piece of o200k's pre-tokenizing
    pattern spans it: only its two letter-run alternatives take letters, and they stop
    before a space; the pattern has no look-behind, and its one look-ahead, after
    whitespace, never reaches past a letter. So the pieces, and with them the BPE tokens,
    of the text are those of the prefix followed by those of the rest.
    """
    found = _LETTER_THEN_SPACE.search(text, max(at_least - 1, 0))
    return found.end() if found else len(text)


def check_chunk(engine, reference, texts, locations, sources, indices, tokens, lengths) -> tuple[int, int]:
    """Compare the sampled documents' `tokens` with `reference`'s; (documents, tokens) checked."""
    ends = np.cumsum(lengths)
    checked = 0
    positions = sample(sources, indices)
    for i in positions:
        ours = tokens[ends[i] - lengths[i] : ends[i]]
        text = texts[i]
        if len(text) > MAX_CHARS:
            text = text[: prefix_end(text, MAX_CHARS)]
        expected = reference.encode(text)
        if len(text) < len(texts[i]):
            ours = ours[: len(expected)]
        if not np.array_equal(ours, expected):
            raise BluesError(f"{locations[i]}: {_difference(engine, ours, expected)}; nothing more was "
                             "written: re-run with --tokenizer_engine tiktoken, and report this document")
        checked += len(expected)
    return len(positions), checked


def _difference(engine, ours: np.ndarray, expected: np.ndarray) -> str:
    n = min(len(ours), len(expected))
    unequal = np.flatnonzero(ours[:n] != expected[:n])
    at = int(unequal[0]) if len(unequal) else n
    return (f"the {engine.name} {engine.version} encoding differs from tiktoken's encode_ordinary at token "
            f"{at} ({_id_at(ours, at)} instead of {_id_at(expected, at)}; "
            f"{len(ours)} ids instead of {len(expected)})")


def _id_at(ids: np.ndarray, at: int):
    return int(ids[at]) if at < len(ids) else "nothing"
