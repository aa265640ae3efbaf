"""Versions that tell the truth: each asset's code version follows the code it runs (a
change marks that asset and its downstream assets stale, an unrelated change nothing), and
re-tokenization is declarative: the raw corpus' new data version, not a hand-written request."""

import os
import shutil
from pathlib import Path

import dagster as dg
import pytest
from blues_project import write_project
from dagster._utils.test.data_versions import get_stale_status_resolver  # what the UI's staleStatus uses
from test_pipelines import CHECKS, EVERYTHING, MERGED, TOKENIZED, TOKENIZED_ASSETS, resources, tokenize_all

from pipelines import assets, export_assets, versions
from pipelines.resources import BluesProject
from pipelines.sensors import build_raw_corpus_sensor

pytestmark = [pytest.mark.filterwarnings("ignore::dagster.PreviewWarning"),
              pytest.mark.filterwarnings("ignore::dagster.BetaWarning")]
VERSIONED = [*TOKENIZED_ASSETS, MERGED, assets.trained_model, assets.model_eval, export_assets.hf_model]


def code_versions(root=None) -> dict[str, str]:
    defs = VERSIONED if root is None else versions.with_source_root(VERSIONED, root)
    return {a.key.to_user_string(): a.specs_by_key[a.key].code_version for a in defs}


@pytest.fixture
def source_copy(tmp_path):
    """A copy of blues_train/ and blues_model/ to edit, as a checkout would be."""
    root = tmp_path / "source"
    for package in versions.PACKAGES:
        shutil.copytree(versions.SOURCE_ROOT / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.zst"))
    return root


def edit(root: Path, module: str) -> None:
    path = root.joinpath(*module.split(".")).with_suffix(".py")
    path.write_text(path.read_text() + "\n# an edit\n")


def changed(before: dict, after: dict) -> set[str]:
    return {key for key in before if before[key] != after[key]}


def test_code_versions_follow_the_code_each_asset_runs(source_copy):
    assert all(v.startswith(versions.package_version() + "+") for v in code_versions().values())
    shipped = code_versions(versions.SOURCE_ROOT)  # as the code location would load them now
    assert code_versions(source_copy) == shipped  # the same code, the same versions

    before = shipped
    for module, assets_changed in [
        ("blues_train.mixture.merge", {"merged_dataset"}),
        ("blues_train.serving.export", {"hf_model"}),
        ("blues_train.data.prepare", set(TOKENIZED)),
        ("blues_model.moe", {"trained_model", "model_eval", "hf_model"}),  # the model is in all three
        ("blues_train.data.sample_corpus", set()),  # nothing the assets run imports it
    ]:
        edit(source_copy, module)
        after = code_versions(source_copy)
        assert changed(before, after) == assets_changed, module
        before = after


def test_a_code_change_marks_the_asset_and_its_downstream_stale(tmp_path, source_copy):
    project = write_project(tmp_path, corpus_mb=0.05)
    with dg.instance_for_test() as instance:
        assert tokenize_all(instance, project).success
        assert dg.materialize(EVERYTHING, selection=[MERGED], instance=instance, resources=resources(project)).success

        def staleness(root):
            graph = [dg.AssetsDefinition(specs=[assets.raw_corpus]), *versions.with_source_root([*TOKENIZED_ASSETS, MERGED], root)]
            resolver = get_stale_status_resolver(instance, graph)
            return {key: (resolver.get_status(dg.AssetKey.from_user_string(key)).value,
                          {(c.category.value, c.reason) for c in resolver.get_stale_causes(
                              dg.AssetKey.from_user_string(key))})
                    for key in [*TOKENIZED, "merged_dataset"]}

        assert staleness(source_copy) == {key: ("FRESH", set()) for key in [*TOKENIZED, "merged_dataset"]}
        edit(source_copy, "blues_train.serving.generate")  # tokenization and merging never run it
        assert staleness(source_copy) == {key: ("FRESH", set()) for key in [*TOKENIZED, "merged_dataset"]}

        # A reader only tokenization runs: tokenization is stale; the mixture is not (its inputs'
        # data versions are content hashes: it gets stale once re-tokenizing changes a fingerprint).
        edit(source_copy, "blues_train.data.sources")
        stale = staleness(source_copy)
        assert stale == {**{key: ("STALE", {("CODE", "has a new code version")}) for key in TOKENIZED},
                         "merged_dataset": ("FRESH", set())}
        # The token store format, which tokenization writes and merging reads: both are stale.
        edit(source_copy, "blues_train.data.store")
        assert staleness(source_copy) == {key: ("STALE", {("CODE", "has a new code version")})
                                          for key in [*TOKENIZED, "merged_dataset"]}


def test_tokenization_follows_the_raw_corpus_data_version(tmp_path):
    """What the raw_corpus_sensor did by hand, now AutomationCondition: tokenize what is
    missing, re-tokenize a dataset whose raw corpus got a new data version, and nothing for
    a touched file whose contents (so data version) did not change."""
    project = write_project(tmp_path, corpus_mb=0.05)
    sensor = build_raw_corpus_sensor(TOKENIZED_ASSETS)
    graph = dg.Definitions(assets=[assets.raw_corpus, *TOKENIZED_ASSETS], asset_checks=CHECKS[:1],
                           resources=resources(project))
    with dg.instance_for_test() as instance:
        def observe(previous):
            result = sensor(dg.build_sensor_context(instance=instance, cursor=previous and previous.cursor,
                                                    resources={"project": BluesProject(config_path=str(project))}))
            for event in result.asset_events:
                instance.report_runless_asset_event(event)
            return result

        def requested(previous):
            result = dg.evaluate_automation_conditions(defs=graph, instance=instance,
                                                       cursor=previous and previous.cursor)
            return result, sorted(asset.key.to_user_string() for asset in TOKENIZED_ASSETS
                                  if result.get_num_requested(asset.key))

        first, keys = requested(None)
        assert keys == TOKENIZED  # missing: tokenize every dataset
        assert tokenize_all(instance, project).success
        seen = observe(None)
        tick, keys = requested(first)
        assert keys == []  # the sensor reports the versions the tokenization observed

        texts = tmp_path / "corpus" / "prose" / "texts"
        (texts / "new.txt").write_text("A new document arrived in the prose corpus.\n")
        seen = observe(seen)
        tick, keys = requested(tick)
        assert keys == ["tokenized_dataset/prose"]
        tick, keys = requested(tick)
        assert keys == []  # handled

        touched = next(texts.iterdir())
        os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
        seen = observe(seen)
        assert seen.asset_events == []  # hashed again: the same version, nothing to report
        tick, keys = requested(tick)
        assert keys == []
