"""The asset graph: raw_corpus (a partition per dataset) -> tokenized_dataset/<dataset>
-> [dedup_result, when configured] -> merged_dataset -> trained_model -> model_checkpoint,
model_eval. Each body calls one blues_train function and turns its result into the
metadata people look at.

The per-dataset assets, and `dedup_result` and `merged_dataset`, which depend on them, are
built from the project configuration by `build_data_assets` when the definitions load
(definitions.py); nothing here reads the configuration at import.

Versions (pipelines/versions.py, docs/interfaces.md): every asset's code version is derived
from the code it runs; data versions are content hashes: a token store's fingerprint, the
mixture's fingerprint, a checkpoint's weights' sha256 (the final one's for trained_model).
"""

import re
from pathlib import Path

import dagster as dg

from blues_train.data.prepare import prepare_dataset
from blues_train.data.raw_corpus import corpus_version
from blues_train.data.store import read_manifest
from blues_train.io import storage
from blues_train.io.atomic import write_json_atomic
from blues_train.io.errors import BluesError
from blues_train.mixture.dedup import dedup, removal_sample
from blues_train.mixture.merge import merge
from blues_train.mixture.spec import read_mixture
from blues_train.serving.report import (
    checkpoint_figures,
    evaluate_checkpoint,
    loss_curve_png,
    png_markdown,
    read_metrics,
)
from blues_train.training import checkpoint as checkpoints
from blues_train.training.config import accelerator_env
from blues_train.training.tracking import run_link
from pipelines.config import EvalConfig, MergeConfig, ProjectConfig, TrainConfig, with_overrides
from pipelines.partitions import checkpoint_partitions, dataset_partitions
from pipelines.resources import BluesProject, dagster_failure
from pipelines.versions import versioned_asset

raw_corpus = dg.AssetSpec(
    "raw_corpus",
    partitions_def=dataset_partitions,
    group_name="data",
    kinds={"file"},
    description="A dataset's raw files (the `sources` entry of the project configuration). "
    "Not built by Dagster: the raw_corpus_sensor reports new or changed files (a "
    "materialization, data version = corpus version), each tokenization observes what it "
    "read; both record files, bytes and sha256.",
)


def tokenized_dataset_key(dataset: str) -> dg.AssetKey:
    return dg.AssetKey(["tokenized_dataset", dataset])


# Declarative automation re-tokenizes a dataset when its raw_corpus partition gets a new data
# version (reported by the raw_corpus_sensor as a materialization; a tokenization's own
# observation is not an update), and tokenizes a dataset missing from the instance. No other
# asset is automated: training runs on the retrain schedule.
RAW_CORPUS_CHANGED = dg.AutomationCondition.any_deps_match(
    dg.AutomationCondition.data_version_changed() & ~dg.AutomationCondition.executed_with_root_target()
).with_label("raw corpus data version changed")
# Missing when the condition is first evaluated (`since_last_handled` counts that first
# evaluation as handled), newly missing later, or the raw corpus changed since last handled:
# one request each, never one per tick after a failed tokenization.
TOKENIZE_WHEN = (
    (dg.AutomationCondition.missing() & dg.AutomationCondition.initial_evaluation()
     | (dg.AutomationCondition.newly_missing() | RAW_CORPUS_CHANGED).since_last_handled())
    & ~dg.AutomationCondition.in_progress()
).with_label("missing, or raw corpus changed")


def build_tokenized_dataset(dataset: str) -> dg.AssetsDefinition:
    """The asset `tokenized_dataset/<dataset>`, built from `raw_corpus` partition `dataset`."""

    @versioned_asset(
        runs=("blues_train.data.prepare", "blues_train.data.raw_corpus"),
        key=tokenized_dataset_key(dataset),
        deps=[dg.AssetDep(raw_corpus, partition_mapping=dg.SpecificPartitionsPartitionMapping([dataset]))],
        group_name="data",
        kinds={"arrow"},
        automation_condition=TOKENIZE_WHEN,
    )
    def tokenized_dataset(context: dg.AssetExecutionContext, project: BluesProject) -> dg.MaterializeResult:
        """The dataset's token store: zstd Arrow chunks of o200k_base tokens and a manifest
        (`blues prepare`). Re-running on unchanged raw files changes nothing."""
        cfg = project.load()
        source = cfg.dataset(dataset)
        run = {}
        manifest = prepare_dataset(
            [source.input], source.token_store, fmt=source.format, text_field=source.text_field,
            glob=source.glob, progress=False, executor_name=cfg.executor.name,
            ray_address=cfg.executor.ray_address, run_stats=run,
        )
        context.log.info(f"prepare on {run.get('executor', 'nothing')}: {run.get('items_run', 0)} of "
                         f"{run.get('work_items', 0)} work item(s) run, {run.get('tokens_per_s', 0):,.0f} tokens/s")
        # The sensor usually registered the partition already; a run from a fresh instance
        # (the CLI, the demo) does it here, so the observation lands on a listed partition.
        context.instance.add_dynamic_partitions(dataset_partitions.name, [dataset])
        provenance = record_raw_corpus(context, raw_corpus_observation(dataset, manifest["sources"]))
        totals, stats = manifest["totals"], manifest["stats"]
        skipped = manifest["skipped"]
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": totals["docs"],
                "documents": totals["docs"],
                "tokens": totals["tokens"],
                "input_bytes_per_token": stats["input_bytes_per_token"],
                "stored_bytes_per_token": stats["stored_bytes_per_token"],
                "compression": round(totals["input_bytes"] / max(totals["stored_bytes"], 1), 3),
                "skipped": sum(entry["count"] for entry in skipped.values()),
                "skipped_by_reason": dg.MetadataValue.json(skipped),
                "replacement_char_docs": stats["replacement_char_docs"],
                "doc_tokens_percentiles": dg.MetadataValue.json(stats["doc_tokens_percentiles"]),
                "chunks": len(manifest["chunks"]),
                "executor": run.get("executor", "none (up to date)"),
                "work_items": run.get("work_items", 0),
                "work_items_run": run.get("items_run", 0),
                "tokens_per_s": round(run.get("tokens_per_s", 0.0)),
                "fingerprint": manifest["fingerprint"],
                "path": dg.MetadataValue.path(str(source.token_store)),
            },
            data_version=dg.DataVersion(manifest["fingerprint"]),
            tags=provenance,
        )

    return tokenized_dataset


def record_raw_corpus(context: dg.AssetExecutionContext, observation: dg.AssetObservation) -> dict[str, str]:
    """Store the observation of the raw files just tokenized, and return the provenance tags
    that make the materialization read from it. Dagster takes a step's input versions before
    the step runs, so without them the tokenization of a corpus seen for the first time (the
    CLI, the demo) would look stale against its own observation."""
    context.instance.report_runless_asset_event(observation)
    [record] = context.instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=raw_corpus.key, asset_partitions=[observation.partition]), limit=1).records
    name = raw_corpus.key.to_user_string()
    return {f"dagster/input_event_pointer/{name}": str(record.storage_id),
            f"dagster/input_data_version/{name}": observation.tags["dagster/data_version"]}


def raw_corpus_observation(dataset: str, files: list[dict], event=dg.AssetObservation):
    """The `raw_corpus` partition `dataset` as observed: its files, bytes and hashes (`path`,
    `format`, `bytes`, `sha256` per file, as in a token store's `manifest.sources`; the
    first 200 in the table), versioned by `corpus_version`. `event`: AssetObservation (what
    a tokenization read), or AssetMaterialization (the raw_corpus_sensor: new data written
    outside Dagster, which is what declarative automation reacts to)."""
    columns = {"path": "string", "format": "string", "bytes": "int", "sha256": "string"}
    return event(
        asset_key=raw_corpus.key,
        partition=dataset,
        metadata={
            "files": len(files),
            "bytes": sum(f["bytes"] for f in files),
            "file_table": dg.MetadataValue.table(
                [dg.TableRecord({name: f[name] for name in columns}) for f in files[:200]],
                schema=dg.TableSchema(columns=[dg.TableColumn(n, t) for n, t in columns.items()]),
            ),
        },
        tags={"dagster/data_version": corpus_version([(f["path"], f["sha256"]) for f in files])},
    )


MERGED_DATASET = dg.AssetKey("merged_dataset")
DEDUP_RESULT = dg.AssetKey("dedup_result")
# Rebuilt by the retrain job with the mixture: a dataset tokenized again since the last
# dedup would make `blues merge --dedup` refuse the stale result.
RETRAIN_TAG = ("blues/retrain", "with_mixture")


def build_data_assets(config: ProjectConfig) -> tuple[list[dg.AssetsDefinition], list[dg.AssetsDefinition]]:
    """One tokenized_dataset asset per dataset of the configuration, fixed when the code
    location loads (the raw_corpus_sensor says when the file has more: reload then), and
    what depends on them all: dedup_result (only with a `dedup` section), merged_dataset."""
    tokenized = [build_tokenized_dataset(source.name) for source in config.datasets]
    if config.dedup is None:
        return tokenized, [build_merged_dataset(tokenized)]
    deduplicated = build_dedup_result(tokenized)
    return tokenized, [deduplicated, build_merged_dataset(tokenized, deduplicated)]


def build_dedup_result(tokenized: list[dg.AssetsDefinition]) -> dg.AssetsDefinition:
    @versioned_asset(runs=("blues_train.mixture.dedup",), key=DEDUP_RESULT, deps=tokenized, group_name="data",
                     kinds={"parquet"}, tags=dict([RETRAIN_TAG]))
    def dedup_result(context: dg.AssetExecutionContext, project: BluesProject) -> dg.MaterializeResult:
        """Exact and near-duplicate documents across every dataset (`blues dedup`, the
        configuration's `dedup` section): per-dataset removal counts, and a sample of removed
        documents beside the ones they copy. Chunk signatures are kept, so a re-run hashes
        only new chunks. merged_dataset leaves the removed documents out."""
        cfg = project.load()
        settings = cfg.dedup
        if settings is None:
            raise dg.Failure(f"{cfg.path}: has no dedup section any more; reload the code location",
                             allow_retries=False)
        record = dedup([d.token_store for d in cfg.datasets], settings.output, exact=settings.exact,
                       near=settings.near, threshold=settings.threshold, say=context.log.info,
                       executor_name=cfg.executor.name, ray_address=cfg.executor.ray_address)
        names = [d.name for d in cfg.datasets]
        counts = list(zip(names, record["counts"]))
        return dg.MaterializeResult(
            metadata={
                "removed_documents": record["removals"]["rows"],
                **{f"removed_documents/{name}": row["exact"] + row["near"] for name, row in counts},
                **{f"removed_tokens/{name}": row["removed_tokens"] for name, row in counts},
                "removals": removal_table(names, record),
                "removed_pairs": dg.MetadataValue.text(removed_pairs_text(settings.output, record)),
                "fingerprint": record["fingerprint"],
                "path": dg.MetadataValue.path(str(settings.output)),
            },
            data_version=dg.DataVersion(record["fingerprint"]),
        )

    return dedup_result


def removal_table(names: list[str], record: dict) -> dg.TableMetadataValue:
    columns = {"dataset": "string", "documents": "int", "exact": "int", "near": "int", "removed_tokens": "int"}
    return dg.MetadataValue.table(
        [dg.TableRecord({"dataset": name, "documents": entry["docs"], "exact": row["exact"], "near": row["near"],
                         "removed_tokens": row["removed_tokens"]})
         for name, entry, row in zip(names, record["inputs"], record["counts"])],
        schema=dg.TableSchema(columns=[dg.TableColumn(n, t) for n, t in columns.items()]))


def removed_pairs_text(folder, record: dict) -> str:
    """A few removals as text: the removed document's opening beside the kept one's."""
    blocks = [f"{row['reason']} copy (estimated Jaccard {row['jaccard']:.2f})\n"
              f"  removed {row['source']}:{row['index']} of {row['dataset']}\n    {row['text']!r}\n"
              f"  kept    {row['kept_source']}:{row['kept_index']} of {row['kept_dataset']}\n    {row['kept_text']!r}"
              for row in removal_sample(folder, record)]
    return "\n\n".join(blocks) or "no document removed"


def build_merged_dataset(tokenized: list[dg.AssetsDefinition],
                         deduplicated: dg.AssetsDefinition | None = None) -> dg.AssetsDefinition:
    """merged_dataset on the tokenized datasets, without the documents of `deduplicated`
    (the dedup_result asset) when given."""

    @versioned_asset(runs=("blues_train.mixture.merge", "blues_train.mixture.loader"),
                     key=MERGED_DATASET, deps=[*tokenized, *([deduplicated] if deduplicated else [])],
                     group_name="data", kinds={"json"})
    def merged_dataset(context: dg.AssetExecutionContext, config: MergeConfig,
                       project: BluesProject) -> dg.MaterializeResult:
        """The training mixture: every dataset of the configuration blended by token share
        (`blues merge`), less the documents dedup_result removed when the configuration has
        a `dedup` section (`--dedup`). A manifest, not a copy of the tokens. The realized
        shares are those of the loader's first pass, as `blues verify` reports them."""
        cfg = with_overrides(project.load(), "mixture", config)
        mix = cfg.mixture
        manifest = merge(
            [d.token_store for d in cfg.datasets], mix.output,
            weights=list(mix.weights) if mix.strategy == "weighted" else None,
            strategy=mix.strategy, num_tokens=mix.num_tokens, seed=mix.seed,
            val_fraction=mix.val_fraction, log=context.log,
            dedup=cfg.dedup.output if deduplicated and cfg.dedup else None,
        )
        total = manifest["total_tokens"]
        from blues_train.mixture.loader import realized_shares  # imports torch: not in every Dagster process

        try:
            realized = [round(share, 4) for share in realized_shares(manifest)[0]]
        except BluesError as exc:  # a store unreadable: the blocking mixture_integrity check says why
            context.log.warning(f"realized shares unknown: {exc}")
            realized = [None] * len(manifest["sources"])
        shares = [
            dg.TableRecord({
                "dataset": dataset.name, "target_share": round(source["weight"], 4),
                "realized_share": share, "tokens": source["tokens"],
                "repeat": source["repeat"], "documents": source["docs"],
            })
            for dataset, source, share in zip(cfg.datasets, manifest["sources"], realized)
        ]
        return dg.MaterializeResult(
            metadata={
                "strategy": manifest["strategy"],
                "total_tokens": total,
                "shares": dg.MetadataValue.table(shares, schema=dg.TableSchema(columns=[
                    dg.TableColumn("dataset", "string"), dg.TableColumn("target_share", "float"),
                    dg.TableColumn("realized_share", "float"), dg.TableColumn("tokens", "int"),
                    dg.TableColumn("repeat", "float"), dg.TableColumn("documents", "int"),
                ])),
                "val_fraction": manifest["validation"]["fraction"],
                "seed": manifest["seed"],
                "fingerprint": manifest["fingerprint"],
                "path": dg.MetadataValue.path(str(mix.output)),
            },
            data_version=dg.DataVersion(manifest["fingerprint"]),
        )

    return merged_dataset


# A training run killed mid-way (a lost node, SIGKILL, the OOM killer) is retried in the same
# run, and continues from the run folder's last checkpoint. Re-executing a failed run from the
# UI does the same: the run folder is named after the root run, which re-executions share.
TRAINING_RETRIES = dg.RetryPolicy(max_retries=2)
EXIT_CODE = re.compile(r"failed with code (-?\d+)")


@versioned_asset(
    runs=("blues_train.training.train", "blues_train.serving.lineage", "blues_train.serving.report"),
    deps=[MERGED_DATASET],
    group_name="training",
    kinds={"pytorch", "deepspeed"},
    pool="gpu",
    retry_policy=TRAINING_RETRIES,
)
def trained_model(
    context: dg.AssetExecutionContext,
    config: TrainConfig,
    project: BluesProject,
    pipes: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    """A Blues model trained on the mixture (`blues train`, one process or the DeepSpeed
    launcher), launched through Dagster Pipes: rank 0 streams logs, reports every
    checkpoint (recorded as `model_checkpoint` partitions) and the final metrics. Its data
    version is the final checkpoint's weights' sha256. A retry or a re-execution of the run
    continues from the run folder's last checkpoint (`--resume auto`)."""
    cfg = with_overrides(project.load(), "training", config)
    out = cfg.training.out / run_folder_name(context)
    settings = out / "training_config.json"  # the run's TrainingConfig, kept with its results
    run_config = cfg.training.run_config(cfg.mixture.output, out)
    if run_config.resume is None:
        run_config = run_config.model_copy(update={"resume": "auto"})
    write_json_atomic(settings, run_config.model_dump())
    with dagster_failure():  # no mixture yet: one line
        lineage = training_lineage(cfg)
    # The checkpoints an earlier attempt of this run saved before it was killed.
    _record_checkpoints(context, saved_checkpoints(out), lineage)
    invocation = _launch(pipes, context, cfg.training.command(settings))
    _record_checkpoints(context, [m for m in invocation.get_custom_messages() if m.get("kind") == "checkpoint"],
                        lineage)
    saved = saved_checkpoints(out)
    reported = [r for r in invocation.get_results() if isinstance(r, dg.MaterializeResult)]
    metadata = {
        **(reported[0].metadata if reported else _final_figures(saved)),
        "run_dir": dg.MetadataValue.path(str(out)),
        "checkpoints": len(_run_checkpoint_keys(context)),
        "loss_curve": dg.MetadataValue.md(png_markdown(loss_curve_png(out), "training loss")),
        "mixture_fingerprint": lineage["mixture_fingerprint"],
    }
    link = run_link(out)  # the MLflow run of `--tracking mlflow`
    if link:
        metadata["mlflow_run"] = dg.MetadataValue.url(link) if link.startswith("http") else link
    if saved:
        metadata["checkpoint"] = dg.MetadataValue.path(saved[-1]["path"])
        metadata["model_checkpoint"] = checkpoint_key(context, saved[-1]["step"])
    # The loss spikes training recorded, each with its worst documents (from metrics.jsonl,
    # nothing recomputed) and the `blues lineage` command that lists all of the step's.
    from blues_train.serving.lineage import spike_rows

    spikes = spike_rows(out, saved[-1]["path"] if saved else None)
    metadata["spike_count"] = len(spikes)
    metadata["spikes"] = dg.MetadataValue.table([dg.TableRecord(row) for row in spikes], schema=dg.TableSchema(
        columns=[dg.TableColumn("step", "int"), dg.TableColumn("loss", "float"), dg.TableColumn("median", "float"),
                 dg.TableColumn("ratio", "float"), dg.TableColumn("top_documents", "string"),
                 dg.TableColumn("explain", "string")]))
    version = saved[-1]["weights_sha256"] if saved else None
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version) if version else None)


model_checkpoint = dg.AssetSpec(
    "model_checkpoint",
    deps=[trained_model],
    partitions_def=checkpoint_partitions,
    group_name="training",
    kinds={"safetensors"},
    description="Every checkpoint a training run saved, one partition each "
    "(`<run>-step-000100`): step, losses, path, and what it was trained on (the mixture's "
    "fingerprint, each token store's fingerprint and raw corpus version, every raw file's "
    "sha256). Data version: the weights' sha256. Recorded by trained_model.",
)


def run_folder_name(context: dg.AssetExecutionContext) -> str:
    """`run-<id>` of the root run: a retry (the same run) and a re-execution (a new run with
    the same root) write into the folder of the run they continue."""
    return f"run-{(context.run.root_run_id or context.run.run_id)[:8]}"


def checkpoint_key(context: dg.AssetExecutionContext, step: int) -> str:
    return f"{run_folder_name(context)}-{checkpoints.step_name(step)}"


def _run_checkpoint_keys(context: dg.AssetExecutionContext) -> list[str]:
    prefix = run_folder_name(context) + "-"
    return [k for k in context.instance.get_dynamic_partitions(checkpoint_partitions.name) if k.startswith(prefix)]


def _launch(pipes: dg.PipesSubprocessClient, context: dg.AssetExecutionContext, command: list[str]):
    """Run training. Killed by a signal: the error stands and the RetryPolicy resumes the
    run; exited with an error (a refused setting, a checkpoint that changed): no retry."""
    try:
        return pipes.run(context=context, command=command, env=accelerator_env())
    except Exception as exc:  # Dagster's DagsterPipesExecutionError is not public
        code = EXIT_CODE.search(str(exc))
        if code and int(code.group(1)) > 0:
            raise dg.Failure(description=f"blues train exited with code {code.group(1)}: its error is the last "
                             "line of the run's stderr", allow_retries=False) from None
        raise


def saved_checkpoints(out: Path) -> list[dict]:
    """The complete checkpoints in run folder `out`, oldest first, as Pipes reports them."""
    found = []
    for folder in checkpoints.complete_checkpoints(out / "checkpoints"):
        meta = checkpoints.read_meta(folder)
        found.append({"kind": "checkpoint", "path": str(folder.resolve()), "step": meta["step"],
                      "loss": meta["loss"], "val_loss": meta.get("val_loss"),
                      "mixture_fingerprint": meta["mixture"]["fingerprint"],
                      "weights_sha256": meta.get("files", {}).get(checkpoints.MODEL_FILE)})
    return found


def _final_figures(saved: list[dict]) -> dict:
    """trained_model's figures when the training process had no step left to run (a
    re-execution of a run whose last attempt finished training)."""
    if not saved:
        return {}
    return {"final_loss": saved[-1]["loss"], "final_val_loss": saved[-1]["val_loss"], "steps": saved[-1]["step"]}


def training_lineage(cfg: ProjectConfig) -> dict:
    """What the run trains on, back to the raw files, as checkpoint metadata: the mixture's
    fingerprint, each token store's fingerprint and raw corpus version (the data versions of
    merged_dataset, tokenized_dataset/<name> and raw_corpus/<name>), every raw file's sha256."""
    mixture = read_mixture(cfg.mixture.output)
    names = {d.token_store.resolve(): d.name for d in cfg.datasets}
    stores, files = [], []
    for source in mixture["sources"]:
        name = names.get(storage.path(source["path"]).resolve(), storage.path(source["path"]).name)
        try:
            raw = read_manifest(source["path"])["sources"]
        except BluesError:  # the store vanished since the merge: the mixture check says so
            raw = []
        stores.append(dg.TableRecord({
            "dataset": name, "store_fingerprint": source["fingerprint"],
            "raw_corpus_version": corpus_version([(f["path"], f["sha256"]) for f in raw]), "raw_files": len(raw),
        }))
        files += [dg.TableRecord({"dataset": name, "path": f["path"], "sha256": f["sha256"]}) for f in raw]
    return {
        "mixture_fingerprint": mixture["fingerprint"],
        "token_stores": dg.MetadataValue.table(stores, schema=dg.TableSchema(columns=[
            dg.TableColumn("dataset", "string"), dg.TableColumn("store_fingerprint", "string"),
            dg.TableColumn("raw_corpus_version", "string"), dg.TableColumn("raw_files", "int")])),
        "raw_files": dg.MetadataValue.table(files[:500], schema=dg.TableSchema(columns=[
            dg.TableColumn("dataset", "string"), dg.TableColumn("path", "string"),
            dg.TableColumn("sha256", "string")])),
    }


def _record_checkpoints(context: dg.AssetExecutionContext, reported: list[dict], lineage: dict) -> None:
    """One `model_checkpoint` materialization per checkpoint not recorded yet, versioned
    by its weights' sha256."""
    known = set(context.instance.get_dynamic_partitions(checkpoint_partitions.name))
    new = [(checkpoint_key(context, c["step"]), c) for c in reported]
    new = [(key, c) for key, c in new if key not in known]
    if not new:
        return
    context.instance.add_dynamic_partitions(checkpoint_partitions.name, [key for key, _ in new])
    records = read_metrics(Path(new[0][1]["path"]).parents[1])  # the run folder's step records
    for key, checkpoint in new:
        figures = {name: dg.MetadataValue.float(value) for name, value in checkpoint_figures(checkpoint, records).items()}
        weights = checkpoint.get("weights_sha256")
        context.log_event(dg.AssetMaterialization(
            asset_key=model_checkpoint.key,
            partition=key,
            metadata={**figures, "step": dg.MetadataValue.int(checkpoint["step"]), **lineage,
                      "path": dg.MetadataValue.path(checkpoint["path"]),
                      **({"weights_sha256": weights} if weights else {})},
            tags={"dagster/data_version": weights} if weights else None,
        ))


@versioned_asset(
    runs=("blues_train.serving.report", "blues_train.serving.evaluation"),
    deps=[trained_model, dg.AssetDep(model_checkpoint, partition_mapping=dg.LastPartitionMapping())],
    group_name="training",
    kinds={"pytorch"},
)
def model_eval(
    context: dg.AssetExecutionContext, config: EvalConfig, project: BluesProject
) -> dg.MaterializeResult:
    """A model_checkpoint partition's perplexity on the held-out split of the mixture, sample
    generations, and how evenly its experts share the tokens. The latest checkpoint unless
    the run config names one (`checkpoint: run-…-step-000100`); the metadata says which."""
    cfg = with_overrides(project.load(), "evaluation", config.model_copy(update={"checkpoint": None}))
    key, checkpoint = chosen_checkpoint(context, config.checkpoint)
    ev = cfg.evaluation
    meta = checkpoints.read_meta(checkpoint)
    report = evaluate_checkpoint(  # on windows as long as the model was trained on
        checkpoint, cfg.mixture.output, seq_len=meta["seq_len"],
        windows=ev.val_windows,
        prompts=list(ev.prompts), max_length=ev.max_length, temperature=ev.temperature,
        top_k=ev.top_k,
    )
    samples = "\n\n".join(f"**{s['prompt']!r}** →\n```\n{s['text']}\n```" for s in report["samples"])
    with dagster_failure():
        harness = harness_scores(checkpoint, ev, cfg.path.parent) if ev.tasks else {}
    return dg.MaterializeResult(
        metadata={
            **harness,
            "perplexity": dg.MetadataValue.float(report["perplexity"]),
            "val_loss": dg.MetadataValue.float(report["val_loss"]),
            "val_tokens": dg.MetadataValue.int(report["val_tokens"]),
            "max_expert_load": dg.MetadataValue.float(report["max_expert_load"]),
            "min_expert_load": dg.MetadataValue.float(report["min_expert_load"]),
            "samples": dg.MetadataValue.md(samples),
            "expert_utilization": dg.MetadataValue.md(
                png_markdown(report["expert_utilization_png"], "expert utilization")),
            "model_checkpoint": key,
            "step": dg.MetadataValue.int(meta["step"]),
            "checkpoint": dg.MetadataValue.path(str(checkpoint)),
            "weights_sha256": meta.get("files", {}).get(checkpoints.MODEL_FILE, ""),
        }
    )


def harness_scores(checkpoint: Path, ev, root: Path) -> dict:
    """`blues eval` of `evaluation.tasks` on the checkpoint: each score as numeric metadata
    `lm_eval/<task>/<metric>` (plotted across checkpoints), the results file, and the MLflow
    run the scores were also logged into when the training run was tracked."""
    from blues_train.serving import evaluation

    include_path = str(root / ev.include_path) if ev.include_path else None
    results = evaluation.evaluate(checkpoint, list(ev.tasks), include_path, ev.limit)
    scores = {f"lm_eval/{name}": dg.MetadataValue.float(value) for name, value in evaluation.scores(results).items()}
    written = {"lm_eval_results": dg.MetadataValue.path(str(evaluation.write_results(results)))}
    link = evaluation.track(results)
    if link:
        written["mlflow_run"] = dg.MetadataValue.url(link) if link.startswith("http") else link
    return {**scores, **written}


def chosen_checkpoint(context: dg.AssetExecutionContext, key: str | None) -> tuple[str, Path]:
    """The model_checkpoint partition `key` (default: the latest) and its folder."""
    keys = context.instance.get_dynamic_partitions(checkpoint_partitions.name)
    if not keys:
        raise dg.Failure("model_checkpoint has no partition yet: materialize trained_model first "
                         "(its run must save at least one checkpoint: training.save_interval)", allow_retries=False)
    key = key or keys[-1]
    if key not in keys:
        raise dg.Failure(f"model_checkpoint has no partition {key!r}; the latest is {keys[-1]!r}", allow_retries=False)
    [record] = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=model_checkpoint.key, asset_partitions=[key]), limit=1).records
    path = Path(record.asset_materialization.metadata["path"].value)
    if not checkpoints.is_complete(path):
        raise dg.Failure(f"model_checkpoint {key}: {path} is gone (training keeps the last keep_last "
                         "checkpoints); choose a later partition", allow_retries=False)
    return key, path


def _latest_checkpoint(context: dg.AssetExecutionContext) -> Path:
    event = context.instance.get_latest_materialization_event(trained_model.key)
    entry = event and event.asset_materialization.metadata.get("checkpoint")
    if entry is None:
        raise dg.Failure("trained_model has no checkpoint yet: materialize trained_model first "
                         "(its run must save at least one checkpoint: training.save_interval)")
    return Path(entry.value)
