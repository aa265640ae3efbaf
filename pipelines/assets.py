"""The asset graph: raw_corpus (a partition per dataset) -> tokenized_dataset/<dataset>
-> merged_dataset -> trained_model -> model_checkpoint, model_eval. Each body calls one
blues_train function and turns its result into the metadata people look at.

The per-dataset assets and `merged_dataset`, which depends on them, are built from the
project configuration by `build_data_assets` when the definitions load (definitions.py);
nothing here reads the configuration at import.
"""

from pathlib import Path

import dagster as dg

from blues_train import checkpoint as checkpoints
from blues_train.atomic import write_json_atomic
from blues_train.errors import BluesError
from blues_train.loader import realized_shares
from blues_train.merge import merge
from blues_train.prepare import prepare_dataset
from blues_train.raw_corpus import corpus_version
from blues_train.report import evaluate_checkpoint, loss_curve_png, png_markdown
from pipelines.config import EvalConfig, MergeConfig, ProjectConfig, TrainConfig, with_overrides
from pipelines.partitions import checkpoint_partitions, dataset_partitions
from pipelines.resources import BluesProject

raw_corpus = dg.AssetSpec(
    "raw_corpus",
    partitions_def=dataset_partitions,
    group_name="data",
    kinds={"file"},
    description="A dataset's raw files (the `sources` entry of the project configuration). "
    "Observed, not built: the raw_corpus_sensor and each tokenization record files, bytes "
    "and sha256.",
)


def tokenized_dataset_key(dataset: str) -> dg.AssetKey:
    return dg.AssetKey(["tokenized_dataset", dataset])


def build_tokenized_dataset(dataset: str) -> dg.AssetsDefinition:
    """The asset `tokenized_dataset/<dataset>`, built from `raw_corpus` partition `dataset`."""

    @dg.asset(
        key=tokenized_dataset_key(dataset),
        deps=[dg.AssetDep(raw_corpus, partition_mapping=dg.SpecificPartitionsPartitionMapping([dataset]))],
        group_name="data",
        kinds={"arrow"},
        code_version="1",
    )
    def tokenized_dataset(context: dg.AssetExecutionContext, project: BluesProject) -> dg.MaterializeResult:
        """The dataset's token store: zstd Arrow chunks of o200k_base tokens and a manifest
        (`blues prepare`). Re-running on unchanged raw files changes nothing."""
        source = project.load().dataset(dataset)
        manifest = prepare_dataset(
            [source.input], source.token_store, fmt=source.format, text_field=source.text_field,
            glob=source.glob, progress=False,
        )
        # The sensor usually registered the partition already; a run from a fresh instance
        # (the CLI, the demo) does it here, so the observation lands on a listed partition.
        context.instance.add_dynamic_partitions(dataset_partitions.name, [dataset])
        context.log_event(raw_corpus_observation(dataset, manifest["sources"]))
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
                "fingerprint": manifest["fingerprint"],
                "path": dg.MetadataValue.path(str(source.token_store)),
            },
            data_version=dg.DataVersion(manifest["fingerprint"]),
        )

    return tokenized_dataset


def raw_corpus_observation(dataset: str, files: list[dict]) -> dg.AssetObservation:
    """The `raw_corpus` partition `dataset` as observed: its files, bytes and hashes (`path`,
    `format`, `bytes`, `sha256` per file, as in a token store's `manifest.sources`; the
    first 200 in the table), versioned by `corpus_version`."""
    columns = {"path": "string", "format": "string", "bytes": "int", "sha256": "string"}
    return dg.AssetObservation(
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


def build_data_assets(config: ProjectConfig) -> tuple[list[dg.AssetsDefinition], dg.AssetsDefinition]:
    """One tokenized_dataset asset per dataset of the configuration, fixed when the code
    location loads (the raw_corpus_sensor says when the file has more: reload then), and
    the merged_dataset that depends on them all."""
    tokenized = [build_tokenized_dataset(source.name) for source in config.datasets]
    return tokenized, build_merged_dataset(tokenized)


def build_merged_dataset(tokenized: list[dg.AssetsDefinition]) -> dg.AssetsDefinition:
    @dg.asset(key=MERGED_DATASET, deps=tokenized, group_name="data", kinds={"json"}, code_version="1")
    def merged_dataset(context: dg.AssetExecutionContext, config: MergeConfig,
                       project: BluesProject) -> dg.MaterializeResult:
        """The training mixture: every dataset of the configuration blended by token share
        (`blues merge`). A manifest, not a copy of the tokens. The realized shares are those of
        the loader's first pass, as `blues verify` reports them."""
        cfg = with_overrides(project.load(), "mixture", config)
        mix = cfg.mixture
        manifest = merge(
            [d.token_store for d in cfg.datasets], mix.output,
            weights=list(mix.weights) if mix.strategy == "weighted" else None,
            strategy=mix.strategy, num_tokens=mix.num_tokens, seed=mix.seed,
            val_fraction=mix.val_fraction, log=context.log,
        )
        total = manifest["total_tokens"]
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


@dg.asset(
    deps=[MERGED_DATASET],
    group_name="training",
    kinds={"pytorch", "deepspeed"},
    pool="gpu",
    code_version="1",
)
def trained_model(
    context: dg.AssetExecutionContext,
    config: TrainConfig,
    project: BluesProject,
    pipes: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    """A Blues model trained on the mixture (`blues train`, one process or the DeepSpeed
    launcher), launched through Dagster Pipes: rank 0 streams logs, reports every
    checkpoint (recorded as `model_checkpoint` partitions) and the final metrics."""
    cfg = with_overrides(project.load(), "training", config)
    out = cfg.training.out / _run_name(context)
    settings = out / "training_config.json"  # the run's TrainingConfig, kept with its results
    write_json_atomic(settings, cfg.training.run_config(cfg.mixture.output, out).model_dump())
    invocation = pipes.run(context=context, command=cfg.training.command(settings))
    checkpoints = [m for m in invocation.get_custom_messages() if m.get("kind") == "checkpoint"]
    _record_checkpoints(context, checkpoints)
    reported = invocation.get_materialize_result()
    metadata = {
        **reported.metadata,
        "run_dir": dg.MetadataValue.path(str(out)),
        "checkpoints": len(checkpoints),
        "loss_curve": dg.MetadataValue.md(png_markdown(loss_curve_png(out), "training loss")),
    }
    if checkpoints:
        metadata["checkpoint"] = dg.MetadataValue.path(checkpoints[-1]["path"])
    # The loss spikes training recorded, each with its worst documents (from metrics.jsonl,
    # nothing recomputed) and the `blues lineage` command that lists all of the step's.
    from blues_train.lineage import spike_rows

    spikes = spike_rows(out, checkpoints[-1]["path"] if checkpoints else None)
    metadata["spike_count"] = len(spikes)
    metadata["spikes"] = dg.MetadataValue.table([dg.TableRecord(row) for row in spikes], schema=dg.TableSchema(
        columns=[dg.TableColumn("step", "int"), dg.TableColumn("loss", "float"), dg.TableColumn("median", "float"),
                 dg.TableColumn("ratio", "float"), dg.TableColumn("top_documents", "string"),
                 dg.TableColumn("explain", "string")]))
    return dg.MaterializeResult(metadata=metadata)


model_checkpoint = dg.AssetSpec(
    "model_checkpoint",
    deps=[trained_model],
    partitions_def=checkpoint_partitions,
    group_name="training",
    kinds={"safetensors"},
    description="Every checkpoint a training run saved, one partition each "
    "(`<run>-step-000100`): step, losses, path and the mixture it was trained on. "
    "Recorded by trained_model.",
)


def _run_name(context: dg.AssetExecutionContext) -> str:
    return f"run-{context.run.run_id[:8]}"


def _record_checkpoints(context: dg.AssetExecutionContext, checkpoints: list[dict]) -> None:
    """One `model_checkpoint` materialization per reported checkpoint."""
    keys = [f"{_run_name(context)}-step-{c['step']:06d}" for c in checkpoints]
    if not keys:
        return
    context.instance.add_dynamic_partitions(checkpoint_partitions.name, keys)
    for key, checkpoint in zip(keys, checkpoints):
        figures = {k: v for k, v in checkpoint.items() if k not in ("kind", "path")}
        context.log_event(dg.AssetMaterialization(
            asset_key=model_checkpoint.key,
            partition=key,
            metadata={**figures, "path": dg.MetadataValue.path(checkpoint["path"])},
        ))


@dg.asset(deps=[trained_model], group_name="training", kinds={"pytorch"}, code_version="1")
def model_eval(
    context: dg.AssetExecutionContext, config: EvalConfig, project: BluesProject
) -> dg.MaterializeResult:
    """The last trained model's perplexity on the held-out split of the mixture, sample
    generations, and how evenly its experts share the tokens."""
    cfg = with_overrides(project.load(), "evaluation", config)
    checkpoint = _latest_checkpoint(context)
    ev = cfg.evaluation
    report = evaluate_checkpoint(  # on windows as long as the model was trained on
        checkpoint, cfg.mixture.output, seq_len=checkpoints.read_meta(checkpoint)["seq_len"],
        windows=ev.val_windows,
        prompts=list(ev.prompts), max_length=ev.max_length, temperature=ev.temperature,
        top_k=ev.top_k,
    )
    samples = "\n\n".join(f"**{s['prompt']!r}** →\n```\n{s['text']}\n```" for s in report["samples"])
    return dg.MaterializeResult(
        metadata={
            "perplexity": report["perplexity"],
            "val_loss": report["val_loss"],
            "val_tokens": report["val_tokens"],
            "max_expert_load": report["max_expert_load"],
            "min_expert_load": report["min_expert_load"],
            "samples": dg.MetadataValue.md(samples),
            "expert_utilization": dg.MetadataValue.md(
                png_markdown(report["expert_utilization_png"], "expert utilization")),
            "checkpoint": dg.MetadataValue.path(str(checkpoint)),
        }
    )


def _latest_checkpoint(context: dg.AssetExecutionContext) -> Path:
    event = context.instance.get_latest_materialization_event(trained_model.key)
    entry = event and event.asset_materialization.metadata.get("checkpoint")
    if entry is None:
        raise dg.Failure("trained_model has no checkpoint yet: materialize trained_model first "
                         "(its run must save at least one checkpoint: training.save_interval)")
    return Path(entry.value)
