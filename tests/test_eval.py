"""`blues eval` and `blues eval-tasks`: lm-evaluation-harness scores of a real checkpoint.

The tasks are the offline ones `blues eval-tasks` writes from the session mixture's
held-out documents; the checkpoint is the `reference` run's. Every log-likelihood the
harness reports must be Blues' own (metrics.token_losses, the training loss's computation)
of the same continuation tokens, and must not depend on the batch size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'blues[eval]'")
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")  # nothing may be downloaded

from blues_train import cli  # noqa: E402
from blues_train.data import tokenizer
from blues_train.io.errors import BluesError, require_extra  # noqa: E402
from blues_train.serving.generate import load_model  # noqa: E402
from blues_train.training import metrics

TASKS = "blues_cloze,blues_next_passage"
LIMIT = 6  # examples of each task scored: every one is checked against Blues' own loss


@pytest.fixture(scope="module")
def tasks_dir(mixture_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_tasks")
    assert cli.main(["eval-tasks", "--mixture", str(mixture_dir), "--out", str(out)]) == 0
    return out


FORKS = []
os.register_at_fork(before=lambda: FORKS.append(os.getpid()))


def blues_eval(checkpoint, tasks_dir, *extra) -> dict:
    """Run `blues eval --json --log_samples`; the results JSON it wrote. It forks nothing:
    a fork of a process running torch's threads may deadlock (the harness's bootstrap pool did)."""
    before, forks = set(results_files(checkpoint)), len(FORKS)
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--tasks", TASKS, "--include_path", str(tasks_dir),
                     "--log_samples", "--json", "--limit", str(LIMIT), *extra]) == 0
    assert len(FORKS) == forks
    [new] = set(results_files(checkpoint)) - before
    return json.loads(new.read_text())


def results_files(checkpoint) -> list[Path]:
    return list(Path(checkpoint).parent.glob("*.lm_eval/results-*.json"))


@pytest.fixture(scope="module")
def step8(reference):
    return reference / "checkpoints" / "step-000008"


@pytest.fixture(scope="module")
def by_batch(step8, tasks_dir):
    return {b: blues_eval(step8, tasks_dir, "--batch_size", str(b)) for b in (1, 8)}


def blues_loglikelihood(model, context: str, continuation: str) -> float:
    """Blues' own log-probability of the continuation's tokens (the harness's split: the
    context's trailing spaces go with the continuation)."""
    spaces = len(context) - len(context.rstrip())
    context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
    whole, n_context = tokenizer.encode(context + continuation), len(tokenizer.encode(context))
    ids = torch.tensor([whole])
    losses = metrics.token_losses(model, ids[:, :-1], ids[:, 1:])[0]
    return -float(losses[n_context - 1:].sum())


def test_eval_tasks_are_written_from_held_out_documents(tasks_dir):
    for task in TASKS.split(","):
        items = [json.loads(line) for line in (tasks_dir / f"{task}.jsonl").read_text().splitlines()]
        assert len(items) >= 4
        assert f"task: {task}" in (tasks_dir / f"{task}.yaml").read_text()
    mc = [json.loads(line) for line in (tasks_dir / "blues_next_passage.jsonl").read_text().splitlines()]
    assert all(len(item["choices"]) == 4 and 0 <= item["label"] < 4 for item in mc)


def test_harness_loglikelihoods_are_blues_own(by_batch, step8):
    results = by_batch[8]
    assert results["blues"]["step"] == 8 and results["blues"]["checkpoint"] == str(step8.resolve())
    model = load_model(step8, "cpu")
    checked = 0
    for task in TASKS.split(","):
        for sample in results["samples"][task]:
            for (context, continuation), [[loglikelihood, _]] in zip(sample["arguments"], sample["resps"]):
                assert loglikelihood == pytest.approx(blues_loglikelihood(model, context, continuation),
                                                      abs=1e-4, rel=1e-4)
                checked += 1
    assert checked == LIMIT * (1 + 4)  # one continuation per cloze item, four choices per passage item


def test_scores_do_not_depend_on_the_batch_size(by_batch):
    one, eight = by_batch[1], by_batch[8]
    for task, scores in one["results"].items():  # accuracies equal; perplexities to float rounding
        assert scores == {k: pytest.approx(v, rel=1e-6) if isinstance(v, float) else v
                          for k, v in eight["results"][task].items()}
    for task in TASKS.split(","):
        for a, b in zip(one["samples"][task], eight["samples"][task]):
            assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]], rel=1e-6)


def test_unknown_task_is_one_line(step8, tasks_dir, capsys):
    assert cli.main(["eval", "--checkpoint", str(step8), "--tasks", "no_such_task",
                     "--include_path", str(tasks_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --tasks: unknown task(s) no_such_task") and "\n" not in err


def test_a_missing_extra_names_it():
    with pytest.raises(BluesError, match=r"pip install 'blues\[eval\]'"):
        require_extra("blues_no_such_package", "eval", "blues eval")
