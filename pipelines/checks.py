"""Blocking asset checks: a failing check stops the run, so nothing downstream (above all
training) reads data that fails them."""

import dagster as dg

from blues_train.mixture.tokenizer_consistency import tokenizer_problems
from blues_train.mixture.verify import chunk_runner, verify_paths
from pipelines.assets import MERGED_DATASET
from pipelines.resources import BluesProject


def build_token_store_integrity(tokenized_datasets: list[dg.AssetsDefinition]) -> dg.AssetChecksDefinition:
    """The blocking integrity check of every loaded `tokenized_dataset/<name>` asset."""

    @dg.multi_asset_check(
        specs=[dg.AssetCheckSpec("token_store_integrity", asset=asset, blocking=True)
               for asset in tokenized_datasets],
        can_subset=True,
    )
    def token_store_integrity(context: dg.AssetCheckExecutionContext, project: BluesProject):
        """`blues verify` of each dataset's token store: chunk hashes, schema, counts, token ids."""
        config = project.load()
        runner = chunk_runner(config.executor.name, config.executor.ray_address)
        for check_key in sorted(context.selected_asset_check_keys):
            store = config.dataset(check_key.asset_key.path[-1]).token_store
            yield _result(verify_paths([store], runner=runner).problem_lines(),
                          asset_key=check_key.asset_key, check_name=check_key.name)

    return token_store_integrity


@dg.asset_check(asset=MERGED_DATASET, blocking=True)
def mixture_integrity(project: BluesProject) -> dg.AssetCheckResult:
    """`blues verify` of the mixture: every store it reads is intact and still has the
    fingerprint the mixture recorded, and the loader realizes the target shares."""
    config = project.load()
    report = verify_paths([config.mixture.output], runner=chunk_runner(config.executor.name, config.executor.ray_address))
    return _result(report.problem_lines(), shares=report.mixtures[0]["sources"] if report.mixtures else [])


@dg.asset_check(asset=MERGED_DATASET, blocking=True)
def tokenizer_consistency(project: BluesProject) -> dg.AssetCheckResult:
    """The mixture, every dataset in it and the model to train agree with the tokenizer
    shipped here (the one generation decodes with)."""
    cfg = project.load()
    return _result(tokenizer_problems(cfg.mixture.output, model=cfg.training.model))


def _result(problems: list[str], shares: list[dict] | None = None, **check) -> dg.AssetCheckResult:
    """`check`: the asset_key and check_name, for a multi-asset check."""
    metadata = {
        "problems": len(problems),
        "details": dg.MetadataValue.md("\n".join(f"- `{p}`" for p in problems[:50]) or "none"),
    }
    if shares:
        metadata["realized_shares"] = dg.MetadataValue.json(shares)
    return dg.AssetCheckResult(passed=not problems, metadata=metadata, **check)
