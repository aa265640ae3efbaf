"""`blues sample-corpus`: real text that exists offline wherever Python is installed.

Two datasets, from the running interpreter's standard library, in sorted order (so the
same Python writes the same bytes):
- code:  every `.py` file as one JSON record, in `code/stdlib.jsonl.zst`;
- prose: `pydoc_data.topics` (the help() pages) in `prose/topics.parquet`, each module's
  docstrings in `prose/docstrings.csv`, the `.txt` files CPython ships in `prose/texts/`.
Each dataset holds at most `--max_mb` MB of text.
"""

from __future__ import annotations

import argparse
import ast
import collections
import csv
import functools
import io
import json
import sys
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from blues_train.io import command_line, storage
from blues_train.io.storage import write_bytes as write_atomic  # local: atomic; s3://, gs://: one PUT each

DEFAULT_MAX_MB = 4.0
ZSTD_LEVEL = 10
PARQUET_ROW_GROUP = 64
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
HOLDS_STATEMENTS = (ast.stmt, ast.excepthandler, ast.match_case)  # where a documented node can sit
PROSE_SHARES = {"topics": 0.4, "docstrings": 0.45, "texts": 0.15}


@functools.cache
def stdlib_files(suffix: str) -> tuple[tuple[str, str], ...]:
    """(relative path, text) of the standard library's UTF-8 files with `suffix`, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(root.rglob(f"*{suffix}")):
        relative = path.relative_to(root)
        if SKIP_DIRS.intersection(relative.parts) or not path.is_file():
            continue
        try:
            found.append((relative.as_posix(), path.read_bytes().decode("utf-8")))
        except UnicodeDecodeError:
            continue  # a few test files are deliberately in other encodings
    return tuple(found)


def take(items, budget: int) -> list:
    """Items (name, text) in order, leaving out any that no longer fit in `budget` bytes."""
    taken, used = [], 0
    for name, text in items:
        size = len(text.encode("utf-8"))
        if text.strip() and used + size <= budget:
            taken.append((name, text))
            used += size
    return taken


def statements(tree: ast.Module):
    """The module and its statements, in ast.walk's order (breadth first), without descending
    into expressions: a tenth of the nodes."""
    queue = collections.deque([tree])
    while queue:
        node = queue.popleft()
        yield node
        queue.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, HOLDS_STATEMENTS))


def module_docstrings(name: str, source: str) -> str:
    """A module's docstring and those of its classes and functions, as one document."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    parts = []
    for node in statements(tree):
        if isinstance(node, DOCUMENTED) and (doc := ast.get_docstring(node)):
            parts.append(f"{name if node is tree else node.name}\n\n{doc}")
    return "\n\n".join(parts)


def write_code(out: Path, budget: int) -> Path:
    records = take(stdlib_files(".py"), budget)
    lines = "".join(json.dumps({"path": name, "text": text}) + "\n" for name, text in records)
    path = out / "code" / "stdlib.jsonl.zst"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(lines.encode()))
    return path


def write_topics(out: Path, budget: int) -> Path:
    from pydoc_data.topics import topics

    rows = take(sorted(topics.items()), budget)
    table = pa.table({"topic": [r[0] for r in rows], "text": [r[1] for r in rows]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=PARQUET_ROW_GROUP, compression="zstd")
    path = out / "prose" / "topics.parquet"
    write_atomic(path, sink.getvalue().to_pybytes())
    return path


def write_docstrings(out: Path, budget: int) -> Path:
    sources = [(name, text) for name, text in stdlib_files(".py") if not _is_test(name)]
    docs = ((name, module_docstrings(name, text)) for name, text in _first_fitting(sources, budget))
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["module", "text"])
    writer.writerows(take(docs, budget))
    path = out / "prose" / "docstrings.csv"
    write_atomic(path, text.getvalue().encode("utf-8"))
    return path


def _first_fitting(sources, budget: int):
    """Source files until their docstrings could fill `budget` (docstrings are a small part)."""
    used = 0
    for name, text in sources:
        if used > budget * 20:
            return
        used += len(text)
        yield name, text


def write_texts(out: Path, budget: int) -> Path:
    folder = out / "prose" / "texts"
    for name, text in take([f for f in stdlib_files(".txt") if not _is_test(f[0])], budget):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text.encode("utf-8"))
    return folder


def _is_test(name: str) -> bool:
    return any(part in ("test", "tests", "idle_test") for part in name.split("/"))


def write_sample_corpus(out, max_mb: float = DEFAULT_MAX_MB) -> dict[str, list[Path]]:
    """Write the sample corpus under `out` (a folder or a URI); the inputs of each dataset, for
    `prepare_dataset`."""
    out = storage.path(out)
    budget = int(max_mb * 1_000_000)
    (out / "prose").mkdir(parents=True, exist_ok=True)
    prose = [
        write_topics(out, int(budget * PROSE_SHARES["topics"])),
        write_docstrings(out, int(budget * PROSE_SHARES["docstrings"])),
        write_texts(out, int(budget * PROSE_SHARES["texts"])),
    ]
    return {"code": [write_code(out, budget)], "prose": prose}


def flag_parser() -> argparse.ArgumentParser:
    parser = command_line.flag_parser("blues sample-corpus", __doc__.splitlines()[0])
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    parser.add_argument("--max_mb", type=float, default=DEFAULT_MAX_MB,
                        help=f"MB of text per dataset at most (default {DEFAULT_MAX_MB:g})")
    return parser


def main(argv=None) -> int:
    args = flag_parser().parse_args(sys.argv[1:] if argv is None else argv)
    datasets = write_sample_corpus(args.out, args.max_mb)
    for name, paths in datasets.items():
        print(f"{name}: {' '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    from blues_train.io.command_line import run_command

    sys.exit(run_command(main, sys.argv[1:]))
