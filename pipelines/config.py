"""The project configuration: one JSON file, validated by pydantic once, overridable per run.

The file keeps the original `config.json` shape and extends it:

    {"datasets": {"paths": ["data_cache/code", ...],   # token stores, one per dataset
                  "weights": [0.5, ...], "merge_strategy": "weighted"},
     "sources": [{"name": "code", "input": "sample_corpus/code",  # raw corpus of paths[i]
                  "format": "text", "glob": "**/*.txt", "text_field": "text"}, ...],
     "mixture": {"output": "data_cache/merged", "num_tokens": null, "seed": 0,
                 "val_fraction": 0.01},
     "training": {"model": "tiny", "out": "runs", "launcher": "python", "num_gpus": 1,
                  "max_steps": 60, ...},  # any `blues train` setting (TrainingConfig)
     "evaluation": {"prompts": ["def "], "max_length": 40, "temperature": 0.8,
                    "top_k": 40, "val_windows": 8,
                    "tasks": [], "include_path": null, "limit": null},  # blues eval tasks
     "schedule": {"retrain_cron": "0 3 * * 0"},
     "dedup": {"output": "data_cache/dedup", "exact": true, "near": true,
               "threshold": 0.8},  # optional: `blues dedup` before the merge
     "executor": {"ray": {"address": "auto"}}}  # optional: prepare, verify, dedup on Ray

`datasets` stays exactly the original section, so `blues merge --config` reads the same
file. `training` holds the fields of `blues_train.training.config.TrainingConfig` (their
defaults are that class's), except that `out` is the folder of the runs (each run gets
`out/run-<id>`) and the mixture is `mixture.output`; plus how to launch (`launcher`,
`num_gpus`), `deepspeed_config` (the `--deepspeed` file) and `args` (more `blues train`
flags). With a `dedup` section the graph runs `blues dedup` on every dataset into `output`
and merges with `--dedup`; without one, nothing is deduplicated. With `executor.ray` the
tokenized_dataset assets, their verify checks, mixture_integrity and dedup_result run their
work items as Ray tasks (`--executor ray`; `address` as `--ray_address`, absent: a Ray instance
on the machine of the Dagster run); without it they run in local processes. Relative paths are
relative to the file's folder, and the inputs and model files named must exist. An error
names the file and the key, and for an unknown key the nearest valid one. Run config (`MergeConfig`, `TrainConfig`, `EvalConfig`) overrides single fields
for one run and goes through the same validation.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import AliasChoices, Field, field_validator

from blues_train.data.sources import DEFAULT_GLOB, FORMATS
from blues_train.io import storage
from blues_train.io.errors import BluesError
from blues_train.io.settings import Settings, validated
from blues_train.mixture.dedup import DEFAULT_THRESHOLD
from blues_train.mixture.merge import DEFAULT_OUTPUT, DatasetsSection, resolve_strategy
from blues_train.mixture.spec import DEFAULT_VAL_FRACTION
from blues_train.training.config import TrainingConfig, flag_parser, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_ENV = "BLUES_CONFIG"
# Dynamic partition keys end up in URLs and file names: keep them plain.
DATASET_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class SourceSection(Settings):
    name: str = Field(pattern=DATASET_NAME)
    input: str
    format: Literal[FORMATS] | None = None
    glob: str = DEFAULT_GLOB
    text_field: str = "text"


class MixtureSection(Settings):
    output: str = DEFAULT_OUTPUT
    num_tokens: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0)
    val_fraction: float = Field(DEFAULT_VAL_FRACTION, ge=0, lt=1)


class TrainingSection(TrainingConfig):
    """A project's training settings: a TrainingConfig and how to launch it."""

    out: str = "runs"
    deepspeed: str | None = Field(None, validation_alias=AliasChoices("deepspeed_config", "deepspeed"))
    launcher: Literal["python", "deepspeed"] = "python"
    num_gpus: int = Field(1, ge=1)
    args: list[str] = []

    @field_validator("num_gpus")
    @classmethod
    def _one_rank_in_process(cls, num_gpus, info):
        if info.data.get("launcher") == "python" and num_gpus != 1:
            raise ValueError("num_gpus must be 1 with launcher 'python'; use launcher 'deepspeed' for several ranks")
        return num_gpus


class EvaluationSection(Settings):
    prompts: list[str] = Field(["def "], min_length=1)
    max_length: int = Field(40, ge=1)
    temperature: float = Field(0.8, ge=0, allow_inf_nan=False)
    top_k: int = Field(40, ge=0)
    val_windows: int = Field(8, ge=1)
    tasks: list[str] = []  # lm-evaluation-harness tasks model_eval also scores (blues eval); none by default
    include_path: str | None = None  # folder of task YAMLs (blues eval-tasks --out), relative to this file
    limit: int | None = Field(None, ge=1)  # examples per task


class ScheduleSection(Settings):
    retrain_cron: str = "0 3 * * 0"

    @field_validator("retrain_cron")
    @classmethod
    def _cron(cls, cron):
        try:  # Dagster's own cron validation, through its public API
            dg.ScheduleDefinition(name="retrain_cron", cron_schedule=cron, job_name="retrain_job")
        except dg.DagsterInvalidDefinitionError:
            raise ValueError(f"{cron!r} is not a cron expression (e.g. '0 3 * * 0')") from None
        return cron


class DedupSection(Settings):
    output: str
    exact: bool = True
    near: bool = True
    threshold: float = Field(DEFAULT_THRESHOLD, gt=0, le=1)


class RaySection(Settings):
    address: str | None = None  # `--ray_address`: auto or ray://host:port; None starts a local instance


class ExecutorSection(Settings):
    ray: RaySection | None = None


class ProjectFile(Settings):
    datasets: DatasetsSection
    sources: list[SourceSection] = Field(min_length=1)
    mixture: MixtureSection = MixtureSection()
    training: TrainingSection = TrainingSection()
    evaluation: EvaluationSection = EvaluationSection()
    schedule: ScheduleSection = ScheduleSection()
    dedup: DedupSection | None = None
    executor: ExecutorSection = ExecutorSection()


@dataclass(frozen=True, kw_only=True)
class ExecutorSettings:
    """Where prepare, verify and dedup run their work items (`blues_train.io.executor`)."""

    name: str  # local | ray
    ray_address: str | None


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
class DedupSettings:
    output: Path
    exact: bool
    near: bool
    threshold: float


@dataclass(frozen=True, kw_only=True)
class TrainingSettings:
    """The project's training section with its paths resolved, and how to launch a run."""

    section: TrainingSection
    out: Path  # folder of the runs

    def __getattr__(self, name):  # max_steps, seq_len, launcher, ... as in the section
        return getattr(self.section, name)

    def run_config(self, mixture_dir: Path, out_dir: Path) -> TrainingConfig:
        """The TrainingConfig of one run into `out_dir` (`args` flags applied)."""
        fields = set(TrainingConfig.model_fields)
        settings = {k: v for k, v in self.section.model_dump(exclude_unset=True).items()
                    if k in fields and v is not None}
        extra = vars(flag_parser("").parse_args(list(self.section.args)))
        extra.pop("training_config", None)
        extra.pop("local_rank", None)
        return TrainingConfig(**{**settings, **extra, "data_cache_dir": str(mixture_dir), "out": str(out_dir)})

    def command(self, config_file: Path) -> list[str]:
        """The training command line for a run whose TrainingConfig is in `config_file`:
        one process, or DeepSpeed's launcher with N ranks on a free rendezvous port."""
        args = ["--training_config", str(config_file)]
        if self.section.launcher == "python":
            return [sys.executable, "-m", "blues_train.training.train", *args]
        launcher = Path(sys.executable).with_name("deepspeed")
        return [str(launcher), "--num_gpus", str(self.section.num_gpus), "--master_port", str(free_port()),
                "--module", "blues_train.training.train", *args]


@dataclass(frozen=True, kw_only=True)
class ProjectConfig:
    path: Path
    raw: dict  # the file's JSON (with run-config overrides applied), for re-validation
    datasets: tuple[DatasetSource, ...]
    mixture: MixtureSettings
    training: TrainingSettings
    evaluation: EvaluationSection
    retrain_cron: str
    dedup: DedupSettings | None  # None: the graph deduplicates nothing
    executor: ExecutorSettings

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
    """Run-config overrides of the `evaluation` settings (unset fields come from the file),
    and the model_checkpoint partition to evaluate (default: the latest)."""

    checkpoint: str | None = None
    prompts: list[str] | None = None
    max_length: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    val_windows: int | None = None
    tasks: list[str] | None = None
    include_path: str | None = None
    limit: int | None = None


def default_config_path() -> Path:
    """`$BLUES_CONFIG`, else `config.json` at the repository root."""
    return Path(os.environ.get(CONFIG_ENV) or REPO_ROOT / "config.json").resolve()


def load_project_config(path: Path | str | None = None) -> ProjectConfig:
    path = Path(path) if path is not None else default_config_path()
    if not path.exists():
        raise BluesError(f"{path}: project configuration not found (set ${CONFIG_ENV} or create it)")
    return parse_project_config(storage.read_json(path), path)


def with_overrides(config: ProjectConfig, section: str, overrides: dg.Config) -> ProjectConfig:
    """`config` with the non-None fields of a run config replacing `section`'s, re-validated."""
    changes = {k: v for k, v in overrides.model_dump().items() if v is not None}
    if not changes:
        return config
    raw = json.loads(json.dumps(config.raw))
    if section == "mixture":
        if "strategy" in changes:
            raw["datasets"]["merge_strategy"] = changes.pop("strategy")
        if "weights" in changes:
            raw["datasets"]["weights"] = changes.pop("weights")
    raw[section] = {**raw.get(section, {}), **changes}
    return parse_project_config(raw, config.path, where=f"run config of {section}")


def parse_project_config(raw: object, path: Path, where: str | None = None) -> ProjectConfig:
    prefix = f"{path}" + (f" ({where})" if where else "") + ": "
    if not isinstance(raw, dict):
        raise BluesError(f"{prefix}the top level must be a JSON object, got {raw!r}")
    file = validated(ProjectFile, raw, prefix)

    def fail(field: str, problem: str):
        raise BluesError(f"{prefix}{field} {problem}")

    base = path.parent

    def located(given: str):
        """A URI as it is (`storage.path`), a relative path from the configuration's folder."""
        return storage.path(given) if storage.is_uri(given) else base / given

    paths, weights = file.datasets.paths, file.datasets.weights
    if len(file.sources) != len(paths):
        fail("sources", f"has {len(file.sources)} entries but datasets.paths has {len(paths)}; "
             "give one raw source per token store, in the same order")
    names = [s.name for s in file.sources]
    for i, name in enumerate(names):
        if names.index(name) != i:
            fail(f"sources[{i}].name", f"{name!r} is used twice; dataset names must be unique")
        if not located(file.sources[i].input).exists():
            fail(f"sources[{i}].input", f"{located(file.sources[i].input)} does not exist; create it or fix the path")
    if weights is not None and len(weights) != len(paths):
        fail("datasets.weights", f"has {len(weights)} entries for {len(paths)} datasets.paths")
    strategy = file.datasets.merge_strategy or ("weighted" if weights else "equal")
    try:  # merge's rule; weights given with another strategy are kept for a later override
        resolve_strategy(strategy, weights if strategy == "weighted" else None)
    except BluesError as exc:
        problem = str(exc)
    else:
        problem = None
    if problem:
        fail("datasets.merge_strategy", problem)
    training = file.training
    if storage.is_remote(training.out):
        fail("training.out", f"{training.out}: the Dagster graph trains into a local folder (its run "
             "records, loss curve and evaluation read it there); use a local path here, or run "
             "`blues train --out s3://...` from the command line")
    model = training.model
    if model is not None and model.endswith(".json"):
        model = str(base / model)
        if not Path(model).is_file():
            fail("training.model", f"{model} does not exist; name a preset (blues-01, tiny) or a BluesConfig JSON file")
    dedup = file.dedup
    if dedup is not None and not (dedup.exact or dedup.near):
        fail("dedup", "finds nothing with exact and near both false; set one true, or remove the section")
    if dedup is not None and storage.is_remote(dedup.output):
        fail("dedup.output", f"{dedup.output}: dedup results are written to a local folder; use a local path")
    updates = {"model": model}
    if training.deepspeed is not None:
        updates["deepspeed"] = str(base / training.deepspeed)
    return ProjectConfig(
        path=path,
        raw=raw,
        datasets=tuple(
            DatasetSource(name=s.name, token_store=located(p), input=located(s.input), format=s.format,
                          glob=s.glob, text_field=s.text_field)
            for s, p in zip(file.sources, paths)
        ),
        mixture=MixtureSettings(output=located(file.mixture.output), strategy=strategy,
                                weights=None if weights is None else tuple(weights),
                                num_tokens=file.mixture.num_tokens, seed=file.mixture.seed,
                                val_fraction=file.mixture.val_fraction),
        training=TrainingSettings(section=training.model_copy(update=updates), out=base / training.out),
        evaluation=file.evaluation,
        retrain_cron=file.schedule.retrain_cron,
        dedup=None if dedup is None else DedupSettings(output=base / dedup.output, exact=dedup.exact,
                                                       near=dedup.near, threshold=dedup.threshold),
        executor=ExecutorSettings(name="local" if file.executor.ray is None else "ray",
                                  ray_address=None if file.executor.ray is None else file.executor.ray.address),
    )
