"""Readers: every format yields the documents a plain reading of the file gives."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from blues_train.data.sources import SkipLog, discover_sources, format_of, iter_documents, parse_json, repair_text
from blues_train.io.errors import BluesError


def read_all(inputs, text_field="text", **kwargs):
    skips = SkipLog()
    docs = list(iter_documents(discover_sources(inputs, **kwargs), text_field, skips))
    return docs, skips.as_dict()


def test_format_from_extension_or_explicit(tmp_path):
    assert format_of(tmp_path / "a.JSONL.zst", None) == "jsonl.zst"
    assert format_of(tmp_path / "a.parquet", None) == "parquet"
    assert format_of(tmp_path / "a.data", "csv") == "csv"
    assert format_of(tmp_path / "a.data", None) is None


def test_unknown_extension_asks_for_format(tmp_path):
    (tmp_path / "a.data").write_text("x")
    with pytest.raises(BluesError, match="--format"):
        discover_sources([tmp_path / "a.data"])


def test_text_folder_is_recursive_one_document_per_file(tmp_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "b.txt").write_text("second")
    (tmp_path / "corpus" / "sub" / "a.txt").write_text("nested")
    (tmp_path / "corpus" / "skip.md").write_text("not matched")
    docs, _ = read_all([tmp_path / "corpus"])
    assert [(d.source, d.text, d.index) for d in docs] == [
        ("corpus/b.txt", "second", 0),
        ("corpus/sub/a.txt", "nested", 0),
    ]
    docs, _ = read_all([tmp_path / "corpus"], glob="**/*.md")
    assert [d.text for d in docs] == ["not matched"]


def test_csv_quoted_commas_quotes_and_newlines(tmp_path):
    rows = [["id", "text"], ["1", 'a, "quoted"\nsecond line'], ["2", "plain"]]
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    docs, skips = read_all([tmp_path / "d.csv"])
    assert [d.text for d in docs] == [rows[1][1], "plain"]
    assert [d.location for d in docs] == ["d.csv:2", "d.csv:4"]
    assert skips == {}


def test_csv_malformed_rows_are_skipped_with_line(tmp_path):
    (tmp_path / "m.csv").write_text('text,n\n"good",1\n"bad"x,2\nshort\nok,3\n')
    docs, skips = read_all([tmp_path / "m.csv"])
    assert [d.text for d in docs] == ["good", "ok"]
    assert skips["malformed_csv"] == {"count": 2, "examples": ["m.csv:3", "m.csv:4"]}


def test_csv_other_text_field(tmp_path):
    (tmp_path / "d.csv").write_text("body,text\nthe body,other\n")
    docs, _ = read_all([tmp_path / "d.csv"], text_field="body")
    assert [d.text for d in docs] == ["the body"]


def jsonl_bytes(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def test_jsonl_malformed_lines_skipped_with_line(tmp_path):
    data = jsonl_bytes([{"text": "one"}]) + b"{broken\n\n[1, 2]\n" + jsonl_bytes([{"text": "two"}])
    (tmp_path / "d.jsonl").write_bytes(data)
    docs, skips = read_all([tmp_path / "d.jsonl"])
    assert [(d.text, d.index, d.location) for d in docs] == [("one", 0, "d.jsonl:1"), ("two", 4, "d.jsonl:5")]
    assert skips["malformed_json"] == {"count": 2, "examples": ["d.jsonl:2", "d.jsonl:4"]}


def test_jsonl_zst_streams_several_frames(tmp_path):
    records = [{"text": f"document {i}"} for i in range(1000)]
    compressor = zstandard.ZstdCompressor()
    halves = jsonl_bytes(records[:500]), jsonl_bytes(records[500:])
    (tmp_path / "d.jsonl.zst").write_bytes(b"".join(compressor.compress(h) for h in halves))
    docs, _ = read_all([tmp_path / "d.jsonl.zst"])
    assert [d.text for d in docs] == [r["text"] for r in records]


def test_parquet_column_by_row_group(tmp_path):
    texts = [f"row {i}" for i in range(700)]
    pq.write_table(pa.table({"text": texts, "n": list(range(700))}), tmp_path / "d.parquet", row_group_size=100)
    docs, _ = read_all([tmp_path / "d.parquet"])
    assert [d.text for d in docs] == texts
    assert docs[-1].index == 699 and docs[-1].location == "d.parquet:row 700"


def test_invalid_utf8_is_repaired_exactly_like_decode_replace(tmp_path):
    raw = "café ".encode() + b"\xff\xfe bad \xc3 end \xe2\x82"
    (tmp_path / "bad.txt").write_bytes(raw)
    (doc,), _ = read_all([tmp_path / "bad.txt"])
    assert repair_text(doc.text) == raw.decode("utf-8", "replace")


def test_empty_documents_are_skipped_and_counted(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(jsonl_bytes([{"text": ""}, {"text": " \n"}, {"text": None}, {"text": "x"}]))
    docs, skips = read_all([tmp_path / "d.jsonl"])
    assert [d.text for d in docs] == ["x"]
    assert skips["empty"]["count"] == 3


def test_field_missing_in_some_records_is_skipped(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(jsonl_bytes([{"body": "a"}, {"text": "b"}, {"text": 5}]))
    docs, skips = read_all([tmp_path / "d.jsonl"])
    assert [d.text for d in docs] == ["b"]
    assert skips["missing_field"]["examples"] == ["d.jsonl:1"]
    assert skips["not_text"]["examples"] == ["d.jsonl:3"]


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv", "d.parquet"])
def test_field_absent_everywhere_names_field_and_first_location(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_bytes(jsonl_bytes([{"body": "a"}, {"body": "b"}]))
    elif name.endswith(".csv"):
        path.write_text("body\na\n")
    else:
        pq.write_table(pa.table({"body": ["a"]}), path)
    with pytest.raises(BluesError, match=rf"'content'.*{name}:(row )?1"):
        read_all([path], text_field="content")


def test_missing_path_and_empty_folder_are_errors(tmp_path):
    with pytest.raises(BluesError, match="nowhere.jsonl does not exist"):
        discover_sources([tmp_path / "nowhere.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(BluesError, match="empty has no files"):
        discover_sources([tmp_path / "empty"])


def test_truncated_jsonl_zst_is_an_error_not_a_short_dataset(tmp_path):
    lines = "".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(5000)).encode()
    whole = zstandard.ZstdCompressor().compress(lines)
    (tmp_path / "cut.jsonl.zst").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(BluesError, match="cut.jsonl.zst: truncated zstd stream"):
        read_all([tmp_path / "cut.jsonl.zst"])


def test_byte_order_mark_is_not_part_of_the_first_field(tmp_path):
    (tmp_path / "a.csv").write_bytes(b"\xef\xbb\xbftext,n\nhello,1\n")
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    docs, skipped = read_all([tmp_path / "a.csv", tmp_path / "b.jsonl"])
    assert [d.text for d in docs] == ["hello", "first", "second"] and not skipped


def _parsed(parse, raw):
    """What the reader takes from a line parsed by `parse`: its "text" field's string (or
    None), or why it has none."""
    try:
        record = parse(raw)
    except (ValueError, RecursionError):
        return "malformed"
    if not isinstance(record, dict):
        return "not an object"
    if "text" not in record:
        return "no text field"
    value = record["text"]
    return repr(value) if value is None or isinstance(value, str) else "not text"


@pytest.mark.parametrize("raw", [
    b'{"text": "plain"}', b'{"text": "caf\xc3\xa9 \\u00e9 \\ud83d\\ude00 \xf0\x9f\x99\x82"}',
    b'{"text": "lone \\ud800 surrogate"}', b'{"text": "bad \xff\xfe bytes"}', b'{"text": "a", "text": "b"}',
    b'{"text": NaN}', b'{"n": 123456789012345678901234567890, "text": "big"}', b'{"text": 123456789012345678901234567890}',
    b'{"text": null}', b'{"other": "x"}', b'{"text": "tab\\t\\r\\n"}  \r\n',
    b'[1, 2]', b'"just a string"', b'{"text": "unterminated', b'{"text": "ctrl \x01"}', b'{"a": 1,}',
    b"[" * 3000 + b"]" * 3000,
])
def test_json_lines_parse_exactly_as_json_loads(raw):
    """The fast path (orjson) yields what json.loads would, or leaves the line to it."""
    reference = _parsed(lambda line: json.loads(line.decode("utf-8", "surrogateescape")), raw)
    assert _parsed(parse_json, raw) == reference
