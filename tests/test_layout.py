"""The layout: blues_train by stage, dependencies one way, documented names that resolve.

    io <- data <- mixture <- training <- serving      (cli.py at the top dispatches)
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blues_train import cli

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("io", "data", "mixture", "training", "serving")  # each may import only those before it
DOCUMENTED = re.compile(r"\bblues_train(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def blues_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.startswith("blues_train.")}


def test_every_module_lives_in_a_stage():
    top = sorted(p.name for p in (ROOT / "blues_train").glob("*.py"))
    assert top == ["__init__.py", "cli.py"], top
    folders = sorted(p.name for p in (ROOT / "blues_train").iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_imports_point_one_way(stage):
    allowed = set(STAGES[: STAGES.index(stage) + 1])
    wrong = []
    for path in sorted((ROOT / "blues_train" / stage).glob("*.py")):
        for name in blues_imports(path):
            target = name.split(".")[1]
            if target == "cli" or (target in STAGES and target not in allowed):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)


def resolve(dotted: str):
    """Import the longest module prefix of `dotted` and look the rest up as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_documented_python_names_resolve():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    names = {(doc.name, m.group(0).rstrip(".")) for doc in docs for m in DOCUMENTED.finditer(doc.read_text())}
    assert ("README.md", "blues_train.mixture.loader.PackedSequenceDataset") in names
    missing = []
    for doc, name in sorted(names):
        if name.endswith((".py", ".json")) or any(part.isupper() for part in name.split(".")):
            continue  # a file, or a placeholder such as blues_train.STAGE.NAME
        try:
            resolve(name)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{doc}: {name} ({exc})")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_answers_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_train_runs_as_a_module():
    """`python -m blues_train.training.train` is what the DeepSpeed launcher runs (`--module`)."""
    out = subprocess.run([sys.executable, "-m", "blues_train.training.train", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--data_cache_dir" in out.stdout, out.stderr[-2000:]


def test_checkpoints_name_no_blues_code(reference):
    """Checkpoints written before a module moved still load: their pickles hold tensors and
    DeepSpeed's own types only, never a blues_train or blues_model class."""
    files = sorted(Path(reference).rglob("*.pt"))
    assert files
    for path in files:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        assert not [g for g in unsafe if g.startswith(("blues_train", "blues_model", "pipelines"))], (path, unsafe)
