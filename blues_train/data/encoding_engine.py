"""Encoding engines for `blues prepare`: gigatoken, fast, guarded by tiktoken, the reference.

An engine's `encode(text)` gives exactly tiktoken's `encode_ordinary(text)` for o200k_base,
as a uint32 array. It also has a `name`, a `version`, `is_reference`, and `reset()`, which
drops its caches and sets `grown` (how much its process has grown since, kept up by
`encoding_workers`) back to 0.

`GigatokenEngine` loads the shipped vocabulary with no special tokens at all, and encodes a
document that contains a special-token string literally (`<|endoftext|>`, `<|endofprompt|>`)
with tiktoken instead: such a string is ordinary text in a Blues store, and tiktoken is what
defines its ids. `spot_check` re-checks a sample of each chunk against tiktoken.
"""

from __future__ import annotations

import functools
from importlib import metadata

import numpy as np

from blues_train.data import tokenizer
from blues_train.io.errors import BluesError

CHOICES = ("auto", "gigatoken", "tiktoken")
SPECIAL_STRINGS = (tokenizer.EOT_TOKEN, tokenizer.EOP_TOKEN)
GIGATOKEN_PRETOKENIZER = "o200k"
# Checked against tiktoken whenever a gigatoken engine is built: code, prose, digits, CRLF,
# runs of spaces and newlines, contractions, accents, CJK, emoji with modifiers.
SELF_TEST_TEXT = (
    "def f(x):\r\n    return x**2  # ok\n\n\n\tif  y != 3.14159: print('done')\n"
    "They'll say it's 2026-12-01, 12,345,678 times. ÉCOLE naïve Straße Ελληνικά русский "
    "漢字かな交じり文 한국어 العربية हिन्दी 👩🏽‍💻🙂 \u00a0\u2003 end.  \n \n"
)


class TiktokenEngine:
    """tiktoken's own encoder: the reference every other engine is checked against."""

    name = "tiktoken"
    is_reference = True

    def __init__(self):
        self.version = metadata.version("tiktoken")
        self.encoding = tokenizer.get_encoding()
        self.grown = 0

    def encode(self, text: str) -> np.ndarray:
        """`encode_ordinary`'s ids, written straight into a uint32 buffer (no list of ints)."""
        return self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    def reset(self) -> None:
        """tiktoken keeps no caches."""
        self.grown = 0


class GigatokenEngine:
    """gigatoken for ordinary documents, tiktoken for those holding a special-token string.

    gigatoken keeps an encode cache that grows with every distinct word it has seen and has
    no setting to bound it; `reset` drops it (see `encoding_workers` for when).
    """

    name = "gigatoken"
    is_reference = False

    def __init__(self, reference: TiktokenEngine | None = None):
        self.version = metadata.version("gigatoken")
        self.reference = reference or TiktokenEngine()
        self.tokenizer = self._load()
        self.grown = 0

    def _load(self):
        import gigatoken

        loaded = gigatoken.Tokenizer.from_tiktoken(
            str(tokenizer.vocabulary_file()), pretokenizer=GIGATOKEN_PRETOKENIZER, special_tokens={})
        if not np.array_equal(loaded.encode(SELF_TEST_TEXT), self.reference.encode(SELF_TEST_TEXT)):
            raise BluesError(f"gigatoken {self.version} does not reproduce tiktoken's o200k_base ids on "
                             "its self-test text: use --tokenizer_engine tiktoken")
        return loaded

    def reset(self) -> None:
        """A fresh tokenizer with empty caches (the vocabulary is loaded again, ~0.4 s)."""
        self.tokenizer = None
        self.tokenizer = self._load()
        self.grown = 0

    def encode(self, text: str) -> np.ndarray:
        if has_special_string(text):
            return self.reference.encode(text)
        return self.tokenizer.encode(text)


def has_special_string(text: str) -> bool:
    return any(special in text for special in SPECIAL_STRINGS)


def check_choice(choice: str) -> None:
    if choice not in CHOICES:
        raise BluesError(f"unknown --tokenizer_engine {choice!r}: use one of {', '.join(CHOICES)}")


def load_engine(choice: str = "auto"):
    """The engine `--tokenizer_engine` names, built once per process; `auto` is gigatoken
    where it imports, else tiktoken."""
    check_choice(choice)
    if choice == "tiktoken":
        return _tiktoken_engine()
    try:
        import gigatoken  # noqa: F401
    except ImportError as exc:
        if choice == "gigatoken":
            raise BluesError(f"--tokenizer_engine gigatoken: gigatoken does not import ({exc}); "
                             "install it (pip install gigatoken) or use --tokenizer_engine tiktoken") from None
        return _tiktoken_engine()
    return _gigatoken_engine()


@functools.cache
def _tiktoken_engine() -> TiktokenEngine:
    return TiktokenEngine()


@functools.cache
def _gigatoken_engine() -> GigatokenEngine:
    return GigatokenEngine(_tiktoken_engine())


def engine_info(engine) -> dict:
    """What a token store's manifest records about the engine that encoded it."""
    return {"name": engine.name, "version": engine.version}
