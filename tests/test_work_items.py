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
    items = work_items.plan_items(sources, [s.path.stat().st_size for s in sources], item_bytes)
    ranges = work_items.ranges_to_count(items)
    counted = {piece: work_items.count_newlines(piece) for piece in ranges}
    items = work_items.with_line_numbers(items, counted)
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
