"""`blues merge`: token shares on real stores, the manifest, and every bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from reference import MASK, blob, splitmix64, store_docs, stream, take, tokens_by_source

from blues_train import cli
from blues_train.io.errors import BluesError
from blues_train.mixture.loader import PackedSequenceDataset
from blues_train.mixture.merge import log_on_stderr, merge
from blues_train.mixture.spec import held_out, read_mixture

SEQ_LEN = 512


@pytest.fixture(autouse=True)
def merge_log_on_stderr(capsys):
    """merge's notices and warnings on stderr, as `blues merge` prints them."""
    with log_on_stderr():
        yield


def manifest(store_dir) -> dict:
    return json.loads((store_dir / "manifest.json").read_text())


@pytest.mark.parametrize("strategy, weights", [("weighted", [0.8, 0.2]), ("equal", None),
                                               ("proportional", None)])
def test_realized_shares_match_targets(tmp_path, code_store, prose_store, strategy, weights):
    mixture = merge([code_store, prose_store], tmp_path, weights=weights, strategy=strategy,
                    val_fraction=0.1)
    sizes = np.array([manifest(s)["totals"]["tokens"] for s in (code_store, prose_store)])
    expected = {"weighted": [0.8, 0.2], "equal": [0.5, 0.5], "proportional": sizes / sizes.sum()}
    assert np.allclose(mixture["weights"], expected[strategy])
    dataset = PackedSequenceDataset(tmp_path, SEQ_LEN)
    ids = stream(take(dataset, dataset.num_windows(0)))
    blobs = [blob(store_docs(s, 0.1)["train"]) for s in (code_store, prose_store)]
    realized = tokens_by_source(ids, blobs)
    assert np.all(np.abs(realized / realized.sum() - expected[strategy]) < 0.01)


def test_no_weights_means_equal_and_weights_mean_weighted(tmp_path, code_store, prose_store):
    assert merge([code_store, prose_store], tmp_path)["strategy"] == "equal"
    assert merge([code_store, prose_store], tmp_path, weights=[1, 3])["strategy"] == "weighted"


def test_manifest_fields_and_atomic_write(tmp_path, code_store, prose_store):
    mixture = merge([code_store, prose_store], tmp_path / "mix", weights=[0.5, 0.5],
                    num_tokens=100_000, seed=7)
    assert read_mixture(tmp_path / "mix") == mixture
    assert sorted(p.name for p in (tmp_path / "mix").iterdir()) == ["mixture.json"]
    assert sum(s["tokens"] for s in mixture["sources"]) == mixture["total_tokens"] == 100_000
    assert [s["fingerprint"] for s in mixture["sources"]] == [
        manifest(code_store)["fingerprint"], manifest(prose_store)["fingerprint"]]
    assert mixture["seed"] == 7 and mixture["validation"]["fraction"] == 0.01
    again = merge([code_store, prose_store], tmp_path / "again", weights=[0.5, 0.5],
                  num_tokens=100_000, seed=7)
    other = merge([code_store, prose_store], tmp_path / "other", weights=[0.5, 0.5],
                  num_tokens=100_000, seed=8)
    assert again["fingerprint"] == mixture["fingerprint"] != other["fingerprint"]


def test_repeated_source_is_reported(tmp_path, code_store, prose_store, capsys):
    mixture = merge([code_store, prose_store], tmp_path, weights=[0.9, 0.1])
    assert mixture["sources"][0]["repeat"] > 1 > mixture["sources"][1]["repeat"]
    assert "warning:" in capsys.readouterr().err and str(code_store) in mixture["sources"][0]["path"]


def test_merge_reads_only_manifests(tmp_path, code_store, prose_store):
    copies = []
    for store_dir in (code_store, prose_store):
        copy = tmp_path / store_dir.name
        copy.mkdir()
        shutil.copy(store_dir / "manifest.json", copy)  # no chunk files at all
        copies.append(copy)
    assert merge(copies, tmp_path / "mix", strategy="proportional")["total_tokens"] > 0


def test_weights_not_summing_to_one_are_normalized(tmp_path, code_store, prose_store, capsys):
    assert cli.main(["merge", "--datasets", str(code_store), str(prose_store),
                     "--weights", "2", "6", "--output", str(tmp_path)]) == 0
    assert read_mixture(tmp_path)["weights"] == [0.25, 0.75]
    assert "notice: weights sum to 8; normalized to 0.2500, 0.7500" in capsys.readouterr().err


def test_config_file(tmp_path, code_store, prose_store):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"datasets": {"paths": [str(code_store), str(prose_store)],
                                               "weights": [0.3, 0.7], "merge_strategy": "weighted"}}))
    assert cli.main(["merge", "--config", str(config), "--output", str(tmp_path / "mix")]) == 0
    assert read_mixture(tmp_path / "mix")["weights"] == [0.3, 0.7]


def test_held_out_rule_matches_its_description():
    sha, indices = "0123456789abcdef" + "0" * 48, np.arange(2000)
    slow = [splitmix64((0x0123456789ABCDEF + int(i)) & MASK) < 0.3 * 2.0**64 for i in indices]
    assert held_out(sha, indices, 0.3).tolist() == slow
    assert 500 < sum(slow) < 700


def run_bad(tmp_path, capsys, *args) -> str:
    out = tmp_path / "out"
    assert cli.main(["merge", "--output", str(out), *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not out.exists()
    return err


def test_bad_weights_count(tmp_path, capsys, code_store, prose_store):
    assert "3 weights for 2 datasets" in run_bad(
        tmp_path, capsys, "--datasets", code_store, prose_store, "--weights", 0.2, 0.3, 0.5)


@pytest.mark.parametrize("weight", ["-0.5", "nan"])
def test_bad_negative_or_nan_weight(tmp_path, capsys, code_store, prose_store, weight):
    assert "must be a finite number >= 0" in run_bad(
        tmp_path, capsys, "--datasets", code_store, prose_store, "--weights", "0.5", weight)


def test_bad_all_zero_weights(tmp_path, capsys, code_store, prose_store):
    assert "all weights are zero" in run_bad(
        tmp_path, capsys, "--datasets", code_store, prose_store, "--weights", 0, 0)


def test_bad_unknown_strategy(tmp_path, capsys, code_store, prose_store):
    assert "unknown strategy 'mixed'" in run_bad(
        tmp_path, capsys, "--datasets", code_store, prose_store, "--strategy", "mixed")


def test_bad_missing_dataset(tmp_path, capsys, code_store):
    missing = tmp_path / "nowhere"
    assert f"{missing}: dataset not found" in run_bad(
        tmp_path, capsys, "--datasets", code_store, missing)


def test_bad_folder_without_manifest(tmp_path, capsys, code_store):
    half_written = tmp_path / "half"
    half_written.mkdir()
    shutil.copy(code_store / "chunk-00000-00000.arrow", half_written)
    assert "has no manifest.json" in run_bad(
        tmp_path, capsys, "--datasets", code_store, half_written)


def test_bad_different_tokenizers(tmp_path, capsys, code_store, prose_store):
    other = tmp_path / "other"
    shutil.copytree(prose_store, other)
    edited = manifest(other)
    edited["tokenizer"] = {**edited["tokenizer"], "name": "cl100k_base", "vocab_sha256": "ab" * 32}
    (other / "manifest.json").write_text(json.dumps(edited))
    assert "differs from" in run_bad(tmp_path, capsys, "--datasets", code_store, other)


def test_bad_same_dataset_twice(tmp_path, capsys, code_store):
    copy = tmp_path / "copy"
    shutil.copytree(code_store, copy)
    assert "given twice" in run_bad(tmp_path, capsys, "--datasets", code_store, code_store)
    assert "given twice" in run_bad(tmp_path, capsys, "--datasets", code_store, copy)


def test_verify_flag_refuses_a_corrupt_source(tmp_path, capsys, code_store, prose_store):
    broken = tmp_path / "broken"
    shutil.copytree(code_store, broken)
    (broken / "chunk-00000-00001.arrow").unlink()
    err = run_bad(tmp_path, capsys, "--datasets", broken, prose_store, "--verify")
    assert "chunk-00000-00001.arrow: missing" in err
    with pytest.raises(BluesError):
        merge([broken, prose_store], tmp_path / "out", verify=True)
