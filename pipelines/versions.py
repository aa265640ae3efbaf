"""Code versions that follow the code: each asset's is derived from what it runs.

    code_version = "<blues package version>+<sha256[:16]>" of
        the asset function's own source, and
        the source files of the blues_train / blues_model modules it names, with every
        module of those packages they import (read from their import statements, at any
        depth, inside functions too; nothing is imported to find them).

So editing `blues_train/mixture/merge.py` gives `merged_dataset` a new code version (and the
assets downstream of it show "upstream code version changed" in the UI), while editing
`blues_train/serving/generate.py`, which tokenization never imports, leaves `tokenized_dataset/*`
as it was. `versioned_asset` is `dg.asset` with such a version; `with_source_root` gives
the same assets the versions they would have with their code under another folder (what
an edited checkout would load).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Callable

import dagster as dg

SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding blues_train/ and blues_model/
PACKAGES = ("blues_train", "blues_model")
# What each versioned asset runs: {asset key: (asset function, modules named)}.
RUNS: dict[dg.AssetKey, tuple[Callable, tuple[str, ...]]] = {}


def package_version() -> str:
    try:
        return metadata.version("blues")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def module_file(module: str, root: Path) -> Path | None:
    """The source file of `module` under `root` (a package's __init__.py), if any."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path, module: str) -> set[str]:
    """The blues_train / blues_model modules `path` (the source of `module`) imports,
    absolute or relative; `from pkg import name` counts `pkg.name` when it is a module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def module_closure(modules, root: Path = SOURCE_ROOT) -> dict[str, Path]:
    """{module: source file} of `modules` and every package module they import, at any depth."""
    files, todo = {}, list(modules)
    while todo:
        module = todo.pop()
        path = module_file(module, root)
        if module in files or path is None:
            continue
        files[module] = path
        parent = module.rpartition(".")[0]  # importing a.b runs a/__init__.py first
        todo.extend(([parent] if parent else []) + sorted(imported_modules(path, module)))
    return dict(sorted(files.items()))


@cache
def _file_digest(path: Path, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code_version(function: Callable, modules, root: Path = SOURCE_ROOT) -> str:
    """`<package version>+<hash>` of `function`'s source and of `modules`' closure."""
    digest = hashlib.sha256(inspect.getsource(function).encode())
    for module, path in module_closure(modules, Path(root)).items():
        stat = path.stat()
        digest.update(f"\n{module}\t{_file_digest(path, stat.st_mtime_ns, stat.st_size)}".encode())
    return f"{package_version()}+{digest.hexdigest()[:16]}"


def versioned_asset(*, runs: tuple[str, ...], **asset_args) -> Callable[[Callable], dg.AssetsDefinition]:
    """`@dg.asset(**asset_args)` whose code version is `code_version(function, runs)`."""

    def decorate(function: Callable) -> dg.AssetsDefinition:
        asset = dg.asset(code_version=code_version(function, runs), **asset_args)(function)
        RUNS[asset.key] = (function, tuple(runs))
        return asset

    return decorate


def with_source_root(assets: list, root: Path) -> list:
    """`assets` with the code versions they would have if blues_train and blues_model
    were the copies under `root` (other definitions unchanged)."""

    def mapped(asset):
        if not isinstance(asset, dg.AssetsDefinition) or asset.key not in RUNS:
            return asset
        version = code_version(*RUNS[asset.key], root=root)
        return asset.map_asset_specs(lambda spec: spec.replace_attributes(code_version=version))

    return [mapped(asset) for asset in assets]
