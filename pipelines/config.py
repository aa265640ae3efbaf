"""The project configuration: one JSON file, validated once, overridable per run.

The file keeps the original `config.json` shape and extends it:

    {"datasets": {"paths": ["data_cache/code", ...],   # token stores, one per dataset
                  "weights": [0.5, ...], "merge_strategy": "weighted"},
     "sources": [{"name": "code", "input": "sample_corpus/code",  # raw corpus of paths[i]
                  "format": "text", "glob": "**/*.txt", "text_field": "text"}, ...],
     "mixture": {"output": "data_cache/merged", "num_tokens": null, "seed": 0,
                 "val_fraction": 0.01},
     "training": {"model": "tiny", "out": "runs", "launcher": "python", "num_gpus": 1,
                  "max_steps": 60, "seq_len": 128, "global_batch_tokens": 4096,
                  "save_interval": 30, "eval_interval": 30, "deepspeed_config": null,
                  "args": []},                      # args: more `blues train` flags
     "evaluation": {"prompts": ["def "], "max_length": 40, "temperature": 0.8,
                    "top_k": 40, "val_windows": 8},
     "schedule": {"retrain_cron": "0 3 * * 0"}}

`datasets` stays exactly the original section, so `blues merge --config` reads the same
file. Relative paths are relative to the file's folder. Errors name the field. Run config
(`MergeConfig`, `TrainConfig`, `EvalConfig`) overrides single fields for one run and goes
through the same validation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from blues_train.errors import BluesError
from blues_train.mixture import STRATEGIES
from blues_train.sources import FORMATS

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_ENV = "BLUES_CONFIG"
LAUNCHERS = ("python", "deepspeed")
# Dynamic partition keys end up in URLs and file names: keep them plain.
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True, kw_only=True)
class DatasetSource:
    name: str
    token_store: Path
    input: Path
    format: str | None
    glob: str
    text_field: str


@dataclass(frozen=True, kw_only=True)
class MixtureSettings:
    output: Path
    strategy: str
    weights: tuple[float, ...] | None
    num_tokens: int | None
    seed: int
    val_fraction: float


@dataclass(frozen=True, kw_only=True)
class TrainingSettings:
    model: str
    out: Path
    launcher: str
    num_gpus: int
    max_steps: int
    seq_len: int
    global_batch_tokens: int
    save_interval: int
    eval_interval: int
    deepspeed_config: Path | None
    args: tuple[str, ...]

    def command(self, mixture_dir: Path, out_dir: Path) -> list[str]:
        """The training command line: one process, or DeepSpeed's launcher with N ranks."""
        args = [
            "--data_cache_dir", str(mixture_dir), "--out", str(out_dir),
            "--model", self.model, "--max_steps", str(self.max_steps),
            "--seq_len", str(self.seq_len), "--global_batch_tokens", str(self.global_batch_tokens),
            "--save_interval", str(self.save_interval),
            "--eval_interval", str(self.eval_interval), *self.args,
        ]
        if self.deepspeed_config is not None:
            args += ["--deepspeed", str(self.deepspeed_config)]
        if self.launcher == "python":
            return [sys.executable, "-m", "blues_train.train", *args]
        launcher = Path(sys.executable).with_name("deepspeed")
        return [str(launcher), "--num_gpus", str(self.num_gpus), "--module", "blues_train.train", *args]


@dataclass(frozen=True, kw_only=True)
class EvaluationSettings:
    prompts: tuple[str, ...]
    max_length: int
    temperature: float
    top_k: int
    val_windows: int


@dataclass(frozen=True, kw_only=True)
class ProjectConfig:
    path: Path
    datasets: tuple[DatasetSource, ...]
    mixture: MixtureSettings
    training: TrainingSettings
    evaluation: EvaluationSettings
    retrain_cron: str

    def dataset(self, name: str) -> DatasetSource:
        for source in self.datasets:
            if source.name == name:
                return source
        known = ", ".join(s.name for s in self.datasets)
        raise BluesError(
            f"{self.path}: no dataset named {name!r} in sources (known: {known}); "
            "add it there, or reload the code location if it was removed"
        )


class MergeConfig(dg.Config):
    """Run-config overrides of the `mixture` settings (unset fields come from the file)."""

    strategy: str | None = None
    weights: list[float] | None = None
    num_tokens: int | None = None
    seed: int | None = None


class TrainConfig(dg.Config):
    """Run-config overrides of the `training` settings (unset fields come from the file)."""

    model: str | None = None
    launcher: str | None = None
    num_gpus: int | None = None
    max_steps: int | None = None
    seq_len: int | None = None
    global_batch_tokens: int | None = None
    save_interval: int | None = None
    eval_interval: int | None = None
    args: list[str] | None = None


class EvalConfig(dg.Config):
    """Run-config overrides of the `evaluation` settings (unset fields come from the file)."""

    prompts: list[str] | None = None
    max_length: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    val_windows: int | None = None


def default_config_path() -> Path:
    """`$BLUES_CONFIG`, else `config.json` at the repository root."""
    return Path(os.environ.get(CONFIG_ENV) or REPO_ROOT / "config.json").resolve()


def load_project_config(path: Path | str | None = None) -> ProjectConfig:
    path = Path(path) if path is not None else default_config_path()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BluesError(f"{path}: project configuration not found (set ${CONFIG_ENV} or create it)")
    except json.JSONDecodeError as exc:
        raise BluesError(f"{path}: not valid JSON: {exc}")
    return parse_project_config(raw, path)


def with_overrides(config: ProjectConfig, section: str, overrides: dg.Config) -> ProjectConfig:
    """`config` with the non-None fields of a run config replacing `section`'s, re-validated."""
    changes = {k: v for k, v in overrides.model_dump().items() if v is not None}
    if not changes:
        return config
    raw = config_to_raw(config)
    if section == "mixture":
        datasets = dict(raw["datasets"])
        if "strategy" in changes:
            datasets["merge_strategy"] = changes.pop("strategy")
        if "weights" in changes:
            datasets["weights"] = changes.pop("weights")
        raw["datasets"] = datasets
    raw[section] = {**raw[section], **changes}
    return parse_project_config(raw, config.path, where=f"run config of {section}")


def parse_project_config(raw: object, path: Path, where: str | None = None) -> ProjectConfig:
    fields = _Fields(path, where)
    root = fields.mapping(raw, "")
    base = path.parent

    datasets = fields.mapping(root.get("datasets"), "datasets")
    paths = fields.list_of(datasets.get("paths"), "datasets.paths", str, nonempty=True)
    sources = fields.list_of(root.get("sources"), "sources", dict, nonempty=True)
    if len(sources) != len(paths):
        fields.fail("sources", f"has {len(sources)} entries but datasets.paths has {len(paths)}; "
                    "give one raw source per token store, in the same order")
    dataset_list = tuple(
        _dataset(fields, source, f"sources[{i}]", base / paths[i], base)
        for i, source in enumerate(sources)
    )
    names = [d.name for d in dataset_list]
    for i, name in enumerate(names):
        if names.index(name) != i:
            fields.fail(f"sources[{i}].name", f"{name!r} is used twice; dataset names must be unique")

    weights = datasets.get("weights")
    if weights is not None:
        weights = fields.list_of(weights, "datasets.weights", (int, float), nonempty=True)
        if len(weights) != len(paths):
            fields.fail("datasets.weights", f"has {len(weights)} entries for {len(paths)} datasets.paths")
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            fields.fail("datasets.weights", "must be finite, non-negative and not all zero")
        weights = tuple(float(w) for w in weights)
    strategy = datasets.get("merge_strategy", "weighted" if weights else "equal")
    fields.choice(strategy, "datasets.merge_strategy", STRATEGIES)
    if strategy == "weighted" and weights is None:
        fields.fail("datasets.weights", "is required when datasets.merge_strategy is 'weighted'")

    mix = fields.mapping(root.get("mixture", {}), "mixture")
    mixture = MixtureSettings(
        output=base / fields.typed(mix.get("output", "data_cache/merged"), "mixture.output", str),
        strategy=strategy,
        weights=weights,
        num_tokens=fields.positive(mix.get("num_tokens"), "mixture.num_tokens", optional=True),
        seed=fields.typed(mix.get("seed", 0), "mixture.seed", int),
        val_fraction=fields.fraction(mix.get("val_fraction", 0.01), "mixture.val_fraction"),
    )

    tr = fields.mapping(root.get("training", {}), "training")
    launcher = tr.get("launcher", "python")
    fields.choice(launcher, "training.launcher", LAUNCHERS)
    ds_config = tr.get("deepspeed_config")
    training = TrainingSettings(
        model=_model_spec(fields.typed(tr.get("model", "tiny"), "training.model", str), base),
        out=base / fields.typed(tr.get("out", "runs"), "training.out", str),
        launcher=launcher,
        num_gpus=fields.positive(tr.get("num_gpus", 1), "training.num_gpus"),
        max_steps=fields.positive(tr.get("max_steps", 60), "training.max_steps"),
        seq_len=fields.positive(tr.get("seq_len", 128), "training.seq_len"),
        global_batch_tokens=fields.positive(tr.get("global_batch_tokens", 4096),
                                            "training.global_batch_tokens"),
        save_interval=fields.positive(tr.get("save_interval", 30), "training.save_interval"),
        eval_interval=fields.positive(tr.get("eval_interval", 30), "training.eval_interval"),
        deepspeed_config=None if ds_config is None
        else base / fields.typed(ds_config, "training.deepspeed_config", str),
        args=tuple(fields.list_of(tr.get("args", []), "training.args", str)),
    )
    if launcher == "python" and training.num_gpus != 1:
        fields.fail("training.num_gpus",
                    "must be 1 with launcher 'python'; use launcher 'deepspeed' for several ranks")

    ev = fields.mapping(root.get("evaluation", {}), "evaluation")
    evaluation = EvaluationSettings(
        prompts=tuple(fields.list_of(ev.get("prompts", ["def "]), "evaluation.prompts", str, nonempty=True)),
        max_length=fields.positive(ev.get("max_length", 40), "evaluation.max_length"),
        temperature=fields.non_negative(ev.get("temperature", 0.8), "evaluation.temperature", (int, float)),
        top_k=fields.non_negative(ev.get("top_k", 40), "evaluation.top_k", int),
        val_windows=fields.positive(ev.get("val_windows", 8), "evaluation.val_windows"),
    )

    schedule = fields.mapping(root.get("schedule", {}), "schedule")
    cron = fields.typed(schedule.get("retrain_cron", "0 3 * * 0"), "schedule.retrain_cron", str)
    try:  # Dagster's own cron validation, through its public API
        dg.ScheduleDefinition(name="retrain_cron", cron_schedule=cron, job_name="retrain_job")
    except dg.DagsterInvalidDefinitionError:
        fields.fail("schedule.retrain_cron", f"{cron!r} is not a cron expression (e.g. '0 3 * * 0')")

    return ProjectConfig(path=path, datasets=dataset_list, mixture=mixture, training=training,
                         evaluation=evaluation, retrain_cron=cron)


def config_to_raw(config: ProjectConfig) -> dict:
    """The inverse of `parse_project_config` (absolute paths), for re-validation."""
    def plain(obj):
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(obj).items()}

    mixture = plain(config.mixture)
    return {
        "datasets": {
            "paths": [str(d.token_store) for d in config.datasets],
            "weights": mixture.pop("weights"),
            "merge_strategy": mixture.pop("strategy"),
        },
        "sources": [{k: v for k, v in plain(d).items() if k != "token_store"} for d in config.datasets],
        "mixture": mixture,
        "training": plain(config.training),
        "evaluation": plain(config.evaluation),
        "schedule": {"retrain_cron": config.retrain_cron},
    }


def _model_spec(model: str, base: Path) -> str:
    """A preset name as it is; a BluesConfig JSON file relative to the config's folder."""
    return str(base / model) if model.endswith(".json") else model


def _dataset(fields: _Fields, raw: dict, where: str, token_store: Path, base: Path) -> DatasetSource:
    name = fields.typed(raw.get("name"), f"{where}.name", str)
    if not DATASET_NAME.match(name):
        fields.fail(f"{where}.name",
                    f"{name!r} must be letters, digits, '_', '.', '-' (it is a partition key)")
    fmt = raw.get("format")
    if fmt is not None:
        fields.choice(fmt, f"{where}.format", FORMATS)
    return DatasetSource(
        name=name,
        token_store=token_store,
        input=base / fields.typed(raw.get("input"), f"{where}.input", str),
        format=fmt,
        glob=fields.typed(raw.get("glob", "**/*.txt"), f"{where}.glob", str),
        text_field=fields.typed(raw.get("text_field", "text"), f"{where}.text_field", str),
    )


class _Fields:
    """Type checks that raise a BluesError naming the file and the field."""

    def __init__(self, path: Path, where: str | None):
        self.prefix = f"{path}" + (f" ({where})" if where else "")

    def fail(self, field: str, problem: str):
        raise BluesError(f"{self.prefix}: {field or 'the top level'} {problem}")

    def typed(self, value, field: str, kind):
        if value is None or isinstance(value, bool) or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.fail(field, f"must be a {names}, got {value!r}")
        return value

    def mapping(self, value, field: str) -> dict:
        if not isinstance(value, dict):
            self.fail(field, f"must be a JSON object, got {value!r}")
        return value

    def list_of(self, value, field: str, kind, nonempty: bool = False) -> list:
        if not isinstance(value, list) or (nonempty and not value):
            self.fail(field, f"must be a {'non-empty ' if nonempty else ''}list, got {value!r}")
        for i, item in enumerate(value):
            self.typed(item, f"{field}[{i}]", kind)
        return value

    def choice(self, value, field: str, choices: tuple[str, ...]):
        if value not in choices:
            self.fail(field, f"must be one of {', '.join(choices)}; got {value!r}")

    def positive(self, value, field: str, optional: bool = False):
        if value is None and optional:
            return None
        if self.typed(value, field, int) <= 0:
            self.fail(field, f"must be a positive integer, got {value!r}")
        return value

    def non_negative(self, value, field: str, kind):
        if not self.typed(value, field, kind) >= 0:
            self.fail(field, f"must be zero or more, got {value!r}")
        return value

    def fraction(self, value, field: str) -> float:
        if not 0 <= self.typed(value, field, (int, float)) < 1:
            self.fail(field, f"must be in [0, 1), got {value!r}")
        return float(value)
