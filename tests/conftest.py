"""Shared fixtures: an offline reference tiktoken, and the real sample corpus."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from blues_train import tokenizer

O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"


@pytest.fixture(scope="session")
def reference_encoding(tmp_path_factory):
    """tiktoken's *own* o200k_base constructor, fed from a cache folder (no network).

    This is the independent reference: tiktoken builds it with its own pattern and
    specials and checks the vocabulary hash itself.
    """
    import tiktoken
    import tiktoken.registry

    cache = tmp_path_factory.mktemp("tiktoken_cache")
    name = hashlib.sha1(O200K_URL.encode()).hexdigest()
    (cache / name).write_bytes(tokenizer.vocabulary_bytes())
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        tiktoken.registry.ENCODINGS.pop("o200k_base", None)
        enc = tiktoken.get_encoding("o200k_base")
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
    return enc
