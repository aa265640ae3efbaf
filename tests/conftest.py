"""Shared fixtures: an offline reference tiktoken, and the real sample corpus."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# OpenMP threads per process, before torch is imported: the cores shared by the xdist workers.
# Two trainings of two threads each on two cores spin against each other (2 to 3 times the CPU
# time of one thread each, measured), and every command a test starts inherits this.
os.environ.setdefault("OMP_NUM_THREADS",
                      str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

import pytest  # noqa: E402
from built_once import built_once
from s3_server import s3  # noqa: F401 (a moto S3 server for the session)
from training_runs import mixture_dir, reference, reference_run, two_rank_run  # noqa: F401 (shared fixtures)

from blues_train.data import tokenizer

O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"


@pytest.fixture(scope="session")
def reference_encoding(tmp_path_factory):
    """tiktoken's *own* o200k_base constructor, fed from a cache folder (no network).

    This is the independent reference: tiktoken builds it with its own pattern and
    specials and checks the vocabulary hash itself.
    """
    import tiktoken
    import tiktoken.registry

    cache = tmp_path_factory.mktemp("tiktoken_cache")
    name = hashlib.sha1(O200K_URL.encode()).hexdigest()
    (cache / name).write_bytes(tokenizer.vocabulary_bytes())
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        tiktoken.registry.ENCODINGS.pop("o200k_base", None)
        enc = tiktoken.get_encoding("o200k_base")
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
    return enc


SAMPLE_MB = 1.0
FIXTURE_CHUNK_TOKENS = 65536  # a few chunks per store, so chunk boundaries get exercised


@pytest.fixture(scope="session")
def sample_corpus_inputs(tmp_path_factory):
    """{"code": [paths], "prose": [paths]}: the sample corpus, about 1 MB per dataset."""
    from blues_train.data.sample_corpus import write_sample_corpus

    def build(folder):
        written = write_sample_corpus(folder, max_mb=SAMPLE_MB)
        return {dataset: [str(path) for path in paths] for dataset, paths in written.items()}

    _, written = built_once(tmp_path_factory, "sample_corpus", build)
    return {dataset: [Path(path) for path in paths] for dataset, paths in written.items()}


@pytest.fixture(scope="session")
def sample_corpus_dir(sample_corpus_inputs):
    """Folder of the sample corpus: code/stdlib.jsonl.zst, prose/{topics.parquet,
    docstrings.csv,texts/}."""
    return sample_corpus_inputs["code"][0].parents[1]


def _prepared(tmp_path_factory, inputs, name):
    from blues_train.data.prepare import prepare_dataset

    def build(out):
        prepare_dataset(inputs, out, workers=1, chunk_tokens=FIXTURE_CHUNK_TOKENS, progress=False)

    return built_once(tmp_path_factory, f"store_{name}", build)[0]


@pytest.fixture(scope="session")
def code_store(tmp_path_factory, sample_corpus_inputs):
    """Path of a token store prepared from the sample corpus' code (JSONL.zst)."""
    return _prepared(tmp_path_factory, sample_corpus_inputs["code"], "code")


@pytest.fixture(scope="session")
def prose_store(tmp_path_factory, sample_corpus_inputs):
    """Path of a token store prepared from the sample corpus' prose (Parquet, CSV, text)."""
    return _prepared(tmp_path_factory, sample_corpus_inputs["prose"], "prose")


# The longest files, longest first (from `make test --durations=60`, 2026-12-02). The second
# needs no shared training run: the second worker does not start by waiting for the first to
# build the reference run.
LONGEST_FILES = ["test_lineage.py", "test_postgres_instance.py", "test_dagster_retries.py", "test_s3.py",
                 "test_train.py", "test_checkpoint_safety.py", "test_readme.py", "test_tracking.py",
                 "test_pipelines.py", "test_dagster_dev.py", "test_ui_chromium.py"]


def pytest_collection_modifyitems(config, items):
    longest_files_first(items)
    skip_gpu_tests_without_cuda(items)


def longest_files_first(items):
    """LONGEST_FILES first, then the other files that have a test marked `slow`, then the
    rest, each file's tests in their order: under `-n` (`make test`, each file whole on one
    worker) a long file started last would end the run alone."""
    slow = {item.path.name for item in items if "slow" in item.keywords}

    def rank(item):
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES) + (name not in slow)

    items.sort(key=rank)


def skip_gpu_tests_without_cuda(items):
    """Tests marked `gpu` need CUDA; CI and the development machines have none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
