"""Work items: a file cut into pieces yields exactly the documents, record numbers and skips of
reading it whole (the independent reference: one reader from the first byte)."""

from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blues_train import cli
from blues_train.data import work_items
from blues_train.data.sources import SkipLog, discover_sources, iter_documents, piece_documents
from blues_train.io.executor import LocalExecutor


def read_planned(sources, item_bytes: int):
    items = work_items.plan(LocalExecutor(1), sources, [s.path.stat().st_size for s in sources], item_bytes)
    docs, skips = [], SkipLog()
    for item in items:
        item_skips = SkipLog()
        docs += list(piece_documents(item, "text", item_skips, [False]))
        for reason, entry in item_skips.reasons.items():
            merged = skips.reasons.setdefault(reason, {"count": 0, "examples": []})
            merged["count"] += entry["count"]
            merged["examples"] = (merged["examples"] + entry["examples"])[:5]
    return items, docs, skips


def read_whole(sources):
    skips = SkipLog()
    return list(iter_documents(sources, "text", skips)), skips


def test_jsonl_ranges_give_the_whole_files_records(tmp_path):
    lines = [b'\xef\xbb\xbf{"text": "first, after a byte-order mark"}']
    for n in range(300):
        if n % 37 == 0:
            lines.append(b"")  # a blank line keeps its number
        if n % 41 == 0:
            lines.append(b"{not json")
        lines.append(b'{"text": "record %d %s"}' % (n, b"x" * (n * 7 % 90)) + (b"\r" if n % 5 == 0 else b""))
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "b.jsonl").write_bytes(b"\n".join(lines[:50]))  # no final line break
    sources = discover_sources([tmp_path], glob="*.jsonl")
    expected, expected_skips = read_whole(sources)
    for item_bytes in (1, 2, 17, 64, 999, 4096, 1 << 20):
        items, docs, skips = read_planned(sources, item_bytes)
        assert docs == expected, item_bytes
        assert skips.as_dict() == expected_skips.as_dict()
    assert len(read_planned(sources, 64)[0]) > 100


def random_csv(rng, rows: int, bom: bool, crlf: bool) -> bytes:
    """A CSV of `rows` records: quoted fields with line breaks, escaped quotes and commas,
    blank lines, records of the wrong width (skipped), non-UTF-8 bytes."""
    end = "\r\n" if crlf else "\n"
    out = [("\ufeff" if bom else "") + "id,text,note" + end]
    for n in range(rows):
        kind = rng.random()
        if kind < 0.05:
            out.append(end)  # a blank line keeps its record number
            continue
        if kind < 0.08:
            out.append(f"{n},short" + end)  # the wrong width: skipped
            continue
        words = [rng.choice(["alpha", "beta,gamma", 'say ""hi""', "line\nbreak", "x" * rng.randrange(1, 40),
                             "two\r\nlines", "", "caf\u00e9"]) for _ in range(rng.randrange(1, 6))]
        text = " ".join(words)
        quoted = any(c in text for c in ',"\n\r') or rng.random() < 0.3
        field = f'"{text}"' if quoted else text
        note = rng.choice(["n", '"q,uoted"', ""])
        out.append(f"{n},{field},{note}" + end)
    data = "".join(out).encode()
    return data.replace(b"caf\xc3\xa9", b"caf\xe9", 3)  # invalid UTF-8, repaired later


@pytest.mark.parametrize("bom,crlf", [(False, False), (True, True)])
def test_csv_ranges_give_the_whole_files_records(tmp_path, bom, crlf):
    import random

    rng = random.Random(7 + bom)
    (tmp_path / "a.csv").write_bytes(random_csv(rng, 400, bom, crlf))
    (tmp_path / "b.csv").write_bytes(random_csv(rng, 30, bom, crlf).rstrip(b"\r\n"))  # no final line break
    sources = discover_sources([tmp_path], glob="*.csv")
    expected, expected_skips = read_whole(sources)
    assert len(expected) > 300 and expected_skips.reasons["malformed_csv"]["count"] > 5
    assert any("\n" in doc.text for doc in expected)
    sizes = [s.path.stat().st_size for s in sources]
    for item_bytes in (1, 2, 3, 17, 64, 333, 999, 4096, 1 << 20):
        items, docs, skips = read_planned(sources, item_bytes)
        assert docs == expected, item_bytes
        assert skips.as_dict() == expected_skips.as_dict(), item_bytes
    assert len(work_items.plan_items(sources, sizes, 64)) > 100  # cut into many ranges
    assert len(read_planned(sources, 64)[0]) > 100  # and kept so: RFC 4180 quotes


@pytest.mark.parametrize("body", [
    b'id,text\n1,say "hi" there\n2,"a\nb"\n3,c\n',  # a quote inside an unquoted field
    b'id,text\n1,"closed" then text\n2,"a\nb"\n3,c\n',  # text after a closing quote
    b'id,text\n1,b"""\n2,"a\nb"\n3,c\n',  # an unquoted field ending in quotes
    b'id,text\r1,a\r2,"b\nc"\r3,d\r',  # lone carriage returns end records
    b'id,text\n1,"never closed\n2,b\n3,c\n',  # the file ends inside quotes
])
def test_csv_that_breaks_quote_parity_is_read_whole_and_the_same(tmp_path, body):
    (tmp_path / "odd.csv").write_bytes(body * 20)
    sources = discover_sources([tmp_path], glob="*.csv")
    expected, expected_skips = read_whole(sources)
    for item_bytes in (1, 5, 40):
        items, docs, skips = read_planned(sources, item_bytes)
        assert docs == expected and skips.as_dict() == expected_skips.as_dict(), item_bytes


def test_csv_of_random_bytes_is_read_the_same_cut_or_whole(tmp_path):
    """Whatever the quotes, line breaks and commas, cut or whole reads the same (a file the
    cuts cannot follow is kept whole)."""
    import random

    rng = random.Random(11)
    split = 0
    for trial in range(300):
        alphabet = 'ab,,"""\n\n ' + ("\r" if trial % 4 == 0 else "")
        body = "".join(rng.choice(alphabet) for _ in range(rng.randrange(20, 120)))
        (tmp_path / "r.csv").write_text("text,x\n" + body)
        sources = discover_sources([tmp_path / "r.csv"])
        expected, expected_skips = read_whole(sources)
        for item_bytes in (1, 7, 30):
            items, docs, skips = read_planned(sources, item_bytes)
            assert (docs, skips.as_dict()) == (expected, expected_skips.as_dict()), (trial, body, item_bytes)
            split += len(items) > 1
    assert split > 10  # some of them were read in ranges


def test_parquet_row_groups_give_the_whole_files_rows(tmp_path):
    texts = [f"row {n} " + "y" * (n % 50) if n % 9 else "" for n in range(2000)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "t.parquet", row_group_size=150)
    sources = discover_sources([tmp_path / "t.parquet"])
    expected, expected_skips = read_whole(sources)
    for item_bytes in (1, 3000, 20000):
        items, docs, skips = read_planned(sources, item_bytes)
        assert docs == expected and skips.as_dict() == expected_skips.as_dict()
    assert len(read_planned(sources, 1)[0]) == 14  # one item per row group


@pytest.mark.parametrize("workers", [1, 3])
def test_local_executor_returns_every_result_once(workers):
    results = dict(LocalExecutor(workers).run(pow, [(n, 2) for n in range(20)]))
    assert results == {n: n * n for n in range(20)}


def test_executor_flags_misused_are_one_line_errors(monkeypatch, tmp_path, capsys):
    from blues_train.io.errors import BluesError
    from blues_train.io.executor import make_executor

    monkeypatch.setitem(sys.modules, "ray", None)  # as where the extra is not installed
    with pytest.raises(BluesError, match=r"^--executor ray needs the ray package, which is not installed: "
                                         r"pip install 'blues\[ray\]'$"):
        make_executor("ray")
    with pytest.raises(BluesError, match="--ray_address is for --executor ray"):
        make_executor("local", 1, "auto")
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    assert cli.main(["prepare", "--dataset", str(tmp_path / "a.jsonl"), "--cache_dir", str(tmp_path / "s"),
                     "--executor", "ray"]) == 2
    assert capsys.readouterr().err == ("error: --executor ray needs the ray package, which is not installed: "
                                       "pip install 'blues[ray]'\n")
    assert not (tmp_path / "s").exists()
