import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from reference import NETWORK_OFF

from blues_train.data import tokenizer


def stdlib_texts(limit=40):
    """Real text that exists on every machine with Python: stdlib sources and docs."""
    root = Path(inspect.getfile(inspect)).parent
    files = sorted(root.glob("*.py"))[:limit]
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    import pydoc_data.topics

    texts += list(pydoc_data.topics.topics.values())[:200]
    return texts


def test_ids_equal_tiktoken_own_o200k_base(reference_encoding):
    ours = tokenizer.get_encoding()
    assert ours.n_vocab == reference_encoding.n_vocab == tokenizer.N_VOCAB
    for text in stdlib_texts() + ["héllo wörld ✓ 漢字 🙂", "\x00\r\n\t  ", ""]:
        assert ours.encode_ordinary(text) == reference_encoding.encode_ordinary(text)


def test_special_token_text_is_ordinary():
    text = "a <|endoftext|> b <|endofprompt|> c"
    ids = tokenizer.encode(text)
    assert tokenizer.EOT_ID not in ids and tokenizer.EOP_ID not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.get_encoding().encode_single_token("<|endoftext|>") == tokenizer.EOT_ID


def test_tampered_vocabulary_is_refused(monkeypatch):
    import zstandard

    from blues_train.io.errors import BluesError

    raw = bytearray(tokenizer.vocabulary_bytes())
    raw[100] ^= 1
    monkeypatch.setattr(tokenizer, "packed_vocabulary", lambda: zstandard.ZstdCompressor().compress(bytes(raw)))
    with pytest.raises(BluesError, match="sha256"):
        tokenizer.vocabulary_bytes()


def test_works_with_network_unavailable(tmp_path):
    """A fresh interpreter whose sockets all fail still builds the encoding."""
    script = NETWORK_OFF + (
        "import os; os.environ['TIKTOKEN_CACHE_DIR'] = os.environ['EMPTY']\n"
        "from blues_train.data import tokenizer\n"
        "print(tokenizer.encode('offline works'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={"EMPTY": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == str(tokenizer.encode("offline works"))
