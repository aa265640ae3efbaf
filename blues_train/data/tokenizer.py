"""Hermetic o200k_base: tiktoken with the vocabulary shipped inside this package.

`tiktoken.get_encoding("o200k_base")` downloads its vocabulary on first use; training
clusters and CI often have no network, so the file ships here (zstd-compressed) and its
sha256 is checked against tiktoken's published hash before any token is produced.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import tempfile
from importlib import resources
from pathlib import Path

import tiktoken
import zstandard

from blues_train.io.atomic import write_atomic
from blues_train.io.errors import BluesError

NAME = "o200k_base"
# The `expected_hash` tiktoken itself checks (tiktoken_ext/openai_public.py).
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_RESOURCE = "o200k_base.tiktoken.zst"

EOT_TOKEN = "<|endoftext|>"
EOP_TOKEN = "<|endofprompt|>"
EOT_ID = 199999
EOP_ID = 200018
N_VOCAB = 200019

# Same pre-tokenization pattern as tiktoken's own o200k_base constructor.
PAT_STR = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


def packed_vocabulary() -> bytes:
    """The zstd-compressed vocabulary file as shipped in the package."""
    return resources.files("blues_train.data").joinpath(VOCAB_RESOURCE).read_bytes()


def vocabulary_bytes() -> bytes:
    """The raw o200k_base.tiktoken file, decompressed and sha256-verified."""
    raw = zstandard.ZstdDecompressor().decompress(packed_vocabulary())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != VOCAB_SHA256:
        raise BluesError(
            f"shipped vocabulary blues_train/data/{VOCAB_RESOURCE} has sha256 {digest}, "
            f"expected {VOCAB_SHA256}: reinstall the package"
        )
    return raw


def vocabulary_file() -> Path:
    """A file holding the verified vocabulary, for encoders that load from a path.

    Written once to the user's cache folder (or the temporary folder where that is not
    writable) and used only while its sha256 is still the expected one.
    """
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    folders = [Path(cache) / "blues", Path(tempfile.gettempdir()) / f"blues-{os.getuid()}"]
    name = f"{NAME}-{VOCAB_SHA256[:16]}.tiktoken"
    for folder in folders:
        path = folder / name
        try:
            if hashlib.sha256(path.read_bytes()).hexdigest() == VOCAB_SHA256:
                return path
        except OSError:
            pass
        raw = vocabulary_bytes()
        try:
            write_atomic(path, raw)
            return path
        except BluesError:  # the OS refused: try the next folder
            continue
    raise BluesError(f"cannot write the o200k_base vocabulary to {' or '.join(str(f) for f in folders)}: "
                     "make one of them writable, or set XDG_CACHE_HOME")


@functools.cache
def get_encoding() -> tiktoken.Encoding:
    """The o200k_base encoding, built offline from the shipped vocabulary."""
    ranks = {}
    for line in vocabulary_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        name=NAME,
        pat_str=PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID, EOP_TOKEN: EOP_ID},
    )


def encode(text: str) -> list[int]:
    """Token ids of `text` as ordinary text: special-token strings are never special."""
    return get_encoding().encode_ordinary(text)


def decode(ids) -> str:
    return get_encoding().decode(list(ids))


def tokenizer_info() -> dict:
    """What a token store or checkpoint records about the tokenizer that made it."""
    return {"name": NAME, "vocab_sha256": VOCAB_SHA256, "n_vocab": N_VOCAB, "eot_id": EOT_ID}


def tokenizer_mismatch(recorded) -> str | None:
    """How a recorded `tokenizer_info()` (a token store's, a mixture's) differs from the
    shipped tokenizer, e.g. "tokenizer.n_vocab 100277 differs from the shipped tokenizer's
    200019"; None when it is the same tokenizer."""
    recorded = recorded if isinstance(recorded, dict) else {}
    differences = [f"tokenizer.{key} {recorded.get(key)!r} differs from the shipped tokenizer's {value!r}"
                   for key, value in tokenizer_info().items() if recorded.get(key) != value]
    return ", ".join(differences) or None
