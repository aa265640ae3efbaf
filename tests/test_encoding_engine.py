"""The encoding engines: gigatoken gives tiktoken's own ids on every kind of text, a store
does not depend on the engine or the worker count, the spot check stops a wrong id, and the
workers' memory stays bounded on text whose words never repeat."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
from importlib import metadata

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from reference import NETWORK_OFF

from blues_train import cli
from blues_train.data import encoding_engine, encoding_workers, spot_check, store, tokenizer
from blues_train.data.encoding_engine import GigatokenEngine
from blues_train.data.item_writer import decoded
from blues_train.data.prepare import prepare_dataset
from blues_train.data.sources import SkipLog, discover_sources, iter_documents
from blues_train.io.errors import BluesError

CHUNK = 50_000
SPECIALS = (tokenizer.EOT_TOKEN, tokenizer.EOP_TOKEN)
NEIGHBOURS = ["", " ", "  ", "\n", "\r\n", "\n\n", "\t", " \n", "a", "Word", "x.", "(", "'s", "42", "é", "漢字", "🙂"]


@pytest.fixture(scope="module")
def engine():
    """A gigatoken engine of this test's own, so that encoding here warms no shared cache."""
    return GigatokenEngine()


def sample_texts(inputs) -> list[str]:
    return [decoded(doc.text)[0] for doc in iter_documents(discover_sources(inputs), "text", SkipLog())]


def assert_same_ids(engine, reference, texts) -> None:
    for text in texts:
        assert engine.encode(text).tolist() == reference.encode_ordinary(text), repr(text[:80])


def test_gigatoken_equals_tiktoken_on_the_sample_corpus(engine, reference_encoding, sample_corpus_inputs):
    texts = sample_texts(sample_corpus_inputs["code"] + sample_corpus_inputs["prose"])
    assert len(texts) > 100
    assert_same_ids(engine, reference_encoding, texts)


def special_string_texts(document: str) -> list[str]:
    """Each special string between every two neighbours, and at the start, in the middle and
    at the end of a real document, alone, twice, and both together."""
    texts = [left + special + right for special in SPECIALS for left in NEIGHBOURS for right in NEIGHBOURS]
    middle = len(document) // 2
    for special in SPECIALS:
        texts += [special + document, document[:middle] + special + document[middle:], document + special,
                  special, special * 2, f"{special}\n{special}", document.replace("\n", f"\n{special}", 3)]
    texts.append(SPECIALS[0] + SPECIALS[1])
    return texts


def test_special_token_strings_are_text_in_every_neighbourhood(engine, reference_encoding, sample_corpus_inputs):
    document = sample_texts(sample_corpus_inputs["code"])[0][:3000]
    texts = special_string_texts(document)
    assert all(encoding_engine.has_special_string(t) for t in texts)
    assert_same_ids(engine, reference_encoding, texts)
    assert not {tokenizer.EOT_ID, tokenizer.EOP_ID} & set(np.concatenate([engine.encode(t) for t in texts]).tolist())


def test_gigatoken_without_special_tokens_reads_special_strings_as_text(engine, reference_encoding):
    """The engine sends such documents to tiktoken; gigatoken alone, loaded with no special
    tokens, would give the same ids too (the second line of defence)."""
    texts = special_string_texts("def f():\n    return '<|' + 'endoftext' + '|>'\n")
    for text in texts:
        assert engine.tokenizer.encode(text).tolist() == reference_encoding.encode_ordinary(text), repr(text)


def test_near_miss_special_strings_go_through_gigatoken(engine, reference_encoding):
    texts = ["<|endoftext|", "<|endoftext", "|endoftext|>", "<|EndOfText|>", "< |endoftext|>", "<|endof|>",
             "<|endoftext\u200b|>", "<||endoftext||>", "<|endofprompt", "x<|im_start|>y"]
    assert not any(encoding_engine.has_special_string(t) for t in texts)
    assert_same_ids(engine, reference_encoding, texts)


def edge_case_texts() -> list[str]:
    scripts = ("Hello wörld Ελληνικά русский текст עברית العربية हिन्दी বাংলা ภาษาไทย 한국어 日本語のテキスト "
               "中文字符 ქართული Հայերեն አማርኛ")
    emoji = "👩‍👩‍👧‍👦 👍🏽 🇯🇵🇫🇷 1️⃣ ❤️‍🔥 🧑🏿‍🚀 🙂🙃 " * 3
    return [
        "line one\r\nline two\r\n\r\nline four\r\n", "\r\n" * 50, "a\rb\r\r\nc", "\r", "\n\n\n   \n",
        emoji, scripts, scripts + emoji + "\r\n" + scripts,
        "e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 Z\u0351\u0352\u0353", "a\u00a0b\u2003c\u3000d\u2028e\u2029f",
        "\u200b\u200d\u200e\u202e\ufeff zero width", "\ue000\uf8ff private use \ufffd\ufffd",
        "\x00\x01\x07\x0b\x0c\x1b[0m\x7f", "12345678901234567890 3.14159 1,000,000 0x1F 1e-9",
        "DON'T He'S we'LL I'M they'RE you'VE it'D", "’s ‘quoted’ “double” don’t", "\t\tindented\n\t\t\tmore",
        " " * 10_000 + "x", "a" * 10_000, "ab" * 5_000 + " " + "Zz" * 5_000, "😀" * 2_000, "漢" * 3_000,
        "mixedCASEWordsAndCamelCaseIdentifiersLikeHTTPServerError parse_URL_v2",
    ]


def random_unicode_texts(count: int, seed: int = 0) -> list[str]:
    """Strings of code points drawn from ASCII, Latin, Cyrillic, CJK, emoji and combining ranges."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0x09, 0x0D), (0xA0, 0x24F), (0x300, 0x36F), (0x400, 0x4FF), (0x590, 0x6FF),
              (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x1F300, 0x1F6FF),
              (0x2000, 0x206F)]
    texts = []
    for _ in range(count):
        picks = [rng.choice(ranges) for _ in range(rng.randrange(1, 300))]
        texts.append("".join(chr(rng.randint(low, high)) for low, high in picks))
    return texts


def test_edge_case_and_random_text_equals_tiktoken(engine, reference_encoding):
    assert_same_ids(engine, reference_encoding, edge_case_texts() + random_unicode_texts(400))


def test_invalid_utf8_and_lone_surrogates_are_repaired_as_before_in_every_format(tmp_path, reference_encoding):
    raw = b"valid start \xff\xfe then \xc3 more text \xe2\x82 end \xf0\x9f\x99"
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "bad.txt").write_bytes(raw)
    (folder / "bad.csv").write_bytes(b'text\n"' + raw + b'"\n')
    (folder / "bad.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "' + raw + b'"}\n'))
    pq.write_table(pa.table({"text": pa.array([raw], pa.binary())}), folder / "bad.parquet")
    surrogate_text = "lone \ud800 high and \udfff low surrogates"
    (folder / "surrogates.jsonl").write_text(json.dumps({"text": surrogate_text}) + "\n")
    repaired = reference_encoding.encode_ordinary(raw.decode("utf-8", "replace"))
    expected = {f"in/bad.{ext}": repaired for ext in ("txt", "csv", "jsonl.zst", "parquet")}
    expected["in/surrogates.jsonl"] = reference_encoding.encode_ordinary(surrogate_text)
    for name in encoding_engine.CHOICES[1:]:
        out = tmp_path / name
        manifest = prepare_dataset([folder], out, glob="*", tokenizer_engine=name, progress=False)
        table = store.read_chunk(out / "chunk-00000-00000.arrow")
        assert dict(zip(table.column("source").to_pylist(), table.column("tokens").to_pylist())) == expected
        assert manifest["stats"]["replacement_char_docs"] == 5


def test_a_50_mb_line_equals_tiktoken(tmp_path, sample_corpus_dir, reference_encoding):
    prose = pq.read_table(sample_corpus_dir / "prose" / "topics.parquet").column("text").to_pylist()
    paragraph = " ".join(" ".join(prose).split())
    text = (paragraph + " ") * (50_000_000 // (len(paragraph) + 1) + 1)
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": text}) + "\n")
    manifest = prepare_dataset([tmp_path / "big.jsonl"], tmp_path / "out", tokenizer_engine="gigatoken",
                               progress=False)
    tokens = store.read_chunk(tmp_path / "out" / "chunk-00000-00000.arrow")["tokens"][0].values.to_numpy()
    assert manifest["totals"]["input_bytes"] >= 50_000_000
    assert np.array_equal(tokens, reference_encoding.encode_ordinary(text))
    assert 0 < manifest["tokenizer_engine"]["spot_check"]["tokens"] < 0.01 * len(tokens)


def without_engine(manifest: dict) -> dict:
    return {key: value for key, value in manifest.items() if key != "tokenizer_engine"}


def test_stores_are_identical_whichever_engine_and_worker_count(tmp_path, sample_corpus_inputs, capsys):
    inputs = sample_corpus_inputs["code"] + sample_corpus_inputs["prose"]
    made = {}
    for name in ("gigatoken", "tiktoken"):
        for workers in (1, 2):
            out = tmp_path / f"{name}-{workers}"
            manifest = prepare_dataset(inputs, out, workers=workers, chunk_tokens=CHUNK, tokenizer_engine=name,
                                       progress=False)
            chunks = {c["file"]: (out / c["file"]).read_bytes() for c in manifest["chunks"]}
            made[name, workers] = manifest, chunks
    (first, first_chunks), *others = made.values()
    assert len(first_chunks) > 2
    for manifest, chunks in others:
        assert without_engine(manifest) == without_engine(first) and chunks == first_chunks
    assert made["gigatoken", 1][0]["tokenizer_engine"] == made["gigatoken", 2][0]["tokenizer_engine"]
    checked = made["gigatoken", 1][0]["tokenizer_engine"]["spot_check"]
    assert checked["docs"] >= len(first_chunks) and 0 < checked["tokens"] < 0.05 * first["totals"]["tokens"]
    assert made["tiktoken", 1][0]["tokenizer_engine"]["spot_check"] == {"docs": 0, "tokens": 0}

    store_dir = tmp_path / "gigatoken-1"
    before = {p.name: p.stat().st_mtime_ns for p in store_dir.iterdir()}
    capsys.readouterr()
    again = prepare_dataset(inputs, store_dir, workers=1, chunk_tokens=CHUNK, tokenizer_engine="tiktoken")
    assert "up to date" in capsys.readouterr().out and again == made["gigatoken", 1][0]
    assert {p.name: p.stat().st_mtime_ns for p in store_dir.iterdir()} == before


class FlipsOneId:
    """A real engine whose ids are gigatoken's, except the first id of one document: `target`."""

    def __init__(self, inner, target: str):
        self.inner, self.target = inner, target
        self.name, self.version, self.is_reference, self.grown = inner.name, inner.version, False, 0

    def encode(self, text: str):
        ids = self.inner.encode(text)
        if text == self.target:
            ids = ids.copy()
            ids[0] ^= 1
        return ids

    def reset(self) -> None:
        self.inner.reset()
        self.grown = 0


@pytest.mark.parametrize("workers", [1, 2])
def test_spot_check_stops_the_run_at_a_planted_mismatch(tmp_path, sample_corpus_inputs, engine, workers):
    texts = sample_texts(sample_corpus_inputs["code"])[:200]
    (tmp_path / "code.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    sampled = spot_check.sample(["code.jsonl"] * len(texts), list(range(len(texts))))
    target = next(i for i in sampled if texts.count(texts[i]) == 1)
    with pytest.raises(BluesError, match=rf"^code\.jsonl:{target + 1}: the gigatoken .* differs from tiktoken"):
        prepare_dataset([tmp_path / "code.jsonl"], tmp_path / "out", chunk_tokens=10**9, workers=workers,
                        tokenizer_engine=FlipsOneId(engine, texts[target]), progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob("chunk-*.arrow"))
    honest = prepare_dataset([tmp_path / "code.jsonl"], tmp_path / "out", chunk_tokens=10**9, workers=workers,
                             tokenizer_engine=FlipsOneId(engine, "no such document"), progress=False)
    assert honest["totals"]["docs"] == len(texts)


def test_spot_check_samples_about_one_percent_the_same_way_every_time(sample_corpus_inputs):
    docs = list(iter_documents(discover_sources(sample_corpus_inputs["code"] + sample_corpus_inputs["prose"]),
                               "text", SkipLog()))
    sources, indices = [d.source for d in docs], [d.index for d in docs]
    chosen = spot_check.sample(sources, indices)
    assert chosen == spot_check.sample(sources, indices)
    assert 0.002 * len(docs) <= len(chosen) <= 0.03 * len(docs)
    assert spot_check.sample(sources[:3], indices[:3])  # a small chunk still checks one document


def test_prefix_cut_is_where_tiktoken_splits(reference_encoding, sample_corpus_inputs):
    rng = random.Random(1)
    texts = sample_texts(sample_corpus_inputs["code"] + sample_corpus_inputs["prose"]) + edge_case_texts()
    cuts = 0
    for text in rng.sample(texts, min(300, len(texts))):
        cut = spot_check.prefix_end(text, rng.randrange(len(text) + 1))
        whole = reference_encoding.encode_ordinary(text)
        assert whole[: len(reference_encoding.encode_ordinary(text[:cut]))] == \
            reference_encoding.encode_ordinary(text[:cut]), repr(text[cut - 20 : cut + 20])
        cuts += cut < len(text)
    assert cuts > 100


def unique_words(n_bytes: int, seed: int) -> str:
    """About n_bytes of random lower-case words of 4 to 11 letters: almost none repeats."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 12, n_bytes // 8)
    letters = rng.integers(ord("a"), ord("z") + 1, int(lengths.sum() + len(lengths)), dtype=np.uint8)
    letters[np.cumsum(lengths + 1) - 1] = ord(" ")
    return letters.tobytes().decode("ascii")


@pytest.mark.parametrize("workers", [1, 2])
def test_encoding_memory_stays_bounded_on_text_that_never_repeats(workers):
    """gigatoken caches every distinct word; past the limit, caches are dropped (one worker:
    the engine is reset; more: the worker processes are replaced). Bound: 3 x the limit (a
    cache table doubles, old and new alive at once) plus what the batches still in flight
    add (none for one worker, which checks after every batch)."""
    engine = GigatokenEngine()
    limit, batches = 24 << 20, 32
    runs = {}
    for name, cap in (("capped", limit), ("uncapped", math.inf)):
        engine.reset()
        memory = encoding_workers.EncoderMemory()
        jobs = ((i, [unique_words(1 << 19, i)]) for i in range(batches))
        digest = hashlib.sha256()
        for _, ids in encoding_workers.encode_batches(jobs, engine, workers, cap, memory):
            digest.update(b"".join(a.tobytes() for a in ids))
        runs[name] = memory, digest.hexdigest()
    (capped, capped_ids), (uncapped, uncapped_ids) = runs["capped"], runs["uncapped"]
    assert capped_ids == uncapped_ids
    per_batch = uncapped.peak_growth / (batches / workers)
    in_flight = 0 if workers == 1 else encoding_workers.BATCHES_IN_FLIGHT_PER_WORKER * per_batch
    assert capped.resets >= 2 and capped.peak_growth < 3 * limit + in_flight
    assert uncapped.resets == 0 and uncapped.peak_growth > 3 * limit + in_flight


def test_cli_flag_and_the_manifest_record_the_engine(tmp_path, sample_corpus_inputs, capsys):
    code = sample_corpus_inputs["code"][0]
    for flag, name, version in (([], "gigatoken", metadata.version("gigatoken")),
                                (["--tokenizer_engine", "tiktoken"], "tiktoken", metadata.version("tiktoken"))):
        out = tmp_path / name
        assert cli.main(["prepare", "--dataset", str(code), "--cache_dir", str(out), "--workers", "1", *flag]) == 0
        recorded = store.read_manifest(out)["tokenizer_engine"]
        assert (recorded["name"], recorded["version"]) == (name, version)
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--dataset", str(code), "--cache_dir", str(tmp_path / "x"), "--tokenizer_engine", "rust"])
    assert "invalid choice: 'rust'" in capsys.readouterr().err
    with pytest.raises(BluesError, match="unknown --tokenizer_engine 'rust'"):
        prepare_dataset([code], tmp_path / "y", tokenizer_engine="rust", progress=False)


def test_default_workers_leave_gigatoken_a_core_to_read_and_write(engine):
    cores = len(os.sched_getaffinity(0))
    assert encoding_workers.default_workers(encoding_engine.load_engine("tiktoken")) == cores
    assert encoding_workers.default_workers(engine) == max(1, cores - 1)


def run_python(script: str, env: dict) -> str:
    result = subprocess.run([sys.executable, "-c", script], env={"PATH": "/usr/bin:/bin", **env},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_auto_falls_back_to_tiktoken_where_gigatoken_does_not_import():
    script = (
        "import sys; sys.modules['gigatoken'] = None\n"
        "from blues_train.data import encoding_engine\n"
        "from blues_train.io.errors import BluesError\n"
        "print(encoding_engine.load_engine('auto').name)\n"
        "try:\n"
        "    encoding_engine.load_engine('gigatoken')\n"
        "except BluesError as exc:\n"
        "    print(exc)\n"
    )
    lines = run_python(script, {}).splitlines()
    assert lines[0] == "tiktoken" and lines[1].startswith("--tokenizer_engine gigatoken: gigatoken does not import")


def test_gigatoken_engine_loads_offline_from_the_shipped_vocabulary(tmp_path):
    script = NETWORK_OFF + (
        "from blues_train.data.encoding_engine import GigatokenEngine\n"
        "print(GigatokenEngine().encode('offline works').tolist())\n"
    )
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "HOME": str(tmp_path), "TIKTOKEN_CACHE_DIR": str(tmp_path)}
    assert run_python(script, env) == str(tokenizer.encode("offline works"))
    written = list((tmp_path / "cache" / "blues").iterdir())
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in written] == [tokenizer.VOCAB_SHA256]


def test_vocabulary_file_is_rewritten_when_damaged_and_falls_back_when_unwritable(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tokenizer.vocabulary_file()
    path.write_bytes(path.read_bytes()[:-10])
    assert tokenizer.vocabulary_file() == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tokenizer.VOCAB_SHA256
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    fallback = tokenizer.vocabulary_file()
    assert not fallback.is_relative_to(tmp_path)
    assert hashlib.sha256(fallback.read_bytes()).hexdigest() == tokenizer.VOCAB_SHA256
