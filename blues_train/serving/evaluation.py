"""`blues eval`: score a checkpoint on EleutherAI lm-evaluation-harness tasks (lm_eval).

    blues eval-tasks --mixture data_cache/merged --out eval_tasks     # offline tasks of your domain
    blues eval --checkpoint runs/demo --tasks blues_cloze,blues_next_passage --include_path eval_tasks
    blues eval --checkpoint runs/demo/checkpoints/step-000100 --tasks arc_easy,piqa --limit 200   # online

The checkpoint is scored through a Blues model adapter (blues_train/serving/lm_eval_adapter.py):
the same weights, tokenizer and forward as `blues generate`, without an export step (as fast
as the harness's `hf` model on the export once loaded, and 11-15 s sooner per checkpoint on a
CPU; on the H200 the two paths cost the same: benchmarks/eval_throughput.py, docs/benchmarks.md). The
harness's table is printed (or, with --json, its results as JSON) and the results are
written beside the checkpoint, `step-N.lm_eval/results-<UTC time>.json`, never over an
earlier evaluation. When the checkpoint's run was tracked with MLflow (`blues train --tracking
mlflow`: OUT/mlflow_run.json), every score is also logged into that MLflow run as metric
`lm_eval/<task>/<metric>` at the checkpoint's step. Tasks from --include_path (task YAMLs and local data files) need no
network; the harness's own tasks download their data sets from the Hugging Face hub.

Needs the `eval` extra: pip install 'blues[eval]'.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from blues_train.io import command_line, storage
from blues_train.io.atomic import write_json_atomic
from blues_train.io.errors import BluesError, require_extra
from blues_train.serving.generate import checkpoint_folder, load_model
from blues_train.training import checkpoint, tracking

RESULTS_SUFFIX = ".lm_eval"


def task_manager(tasks: list[str], include_path: str | None):
    """The harness's task index holding every one of `tasks`: the task YAMLs of
    `include_path` (a folder) alone when they have them all (indexing the harness's
    thousands of tasks takes a minute), else those and the harness's own."""
    require_extra("lm_eval", "eval", "blues eval")
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise BluesError(f"--include_path {include_path}: no such folder; pass the folder of task YAMLs "
                             "(blues eval-tasks --out)")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in set(manager.all_tasks)]
    if unknown:
        raise BluesError(f"--tasks: unknown task(s) {', '.join(unknown)}; pass harness task names "
                         "(lm_eval ls tasks) or tasks of --include_path (blues eval-tasks writes some)")
    return manager


def evaluate(checkpoint_path, tasks: list[str], include_path: str | None = None, limit: int | None = None,
             batch_size: int = 1, device: str | None = None, log_samples: bool = False) -> dict:
    """The harness's results for the checkpoint (or run folder's latest checkpoint) on
    `tasks`, with `blues` (what was scored) added."""
    manager = task_manager(tasks, include_path)
    import lm_eval

    from blues_train.serving.lm_eval_adapter import BluesHarnessLM

    folder = checkpoint_folder(checkpoint_path)
    model = load_model(folder, device)
    started = time.perf_counter()
    with bootstrap_in_process():
        results = lm_eval.simple_evaluate(model=BluesHarnessLM(model, batch_size), tasks=tasks, limit=limit,
                                          task_manager=manager, log_samples=log_samples)
    meta = checkpoint.read_meta(folder) if (folder / checkpoint.META_FILE).exists() else {}
    results["blues"] = {"checkpoint": str(folder.resolve()), "step": meta.get("step"),
                        "weights_sha256": meta.get("files", {}).get(checkpoint.MODEL_FILE),
                        "batch_size": batch_size, "limit": limit, "include_path": include_path,
                        "seconds": time.perf_counter() - started}
    return results


@contextlib.contextmanager
def bootstrap_in_process():
    """The harness bootstraps a perplexity's standard error in a `multiprocessing` pool
    forked from this process by default; a fork of a process running torch's threads can
    deadlock in the child (seen: `blues eval` hanging for good in the pool's exit).
    `DISABLE_MULTIPROC` makes the harness draw the same resamples in process."""
    before = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["DISABLE_MULTIPROC"]
        else:
            os.environ["DISABLE_MULTIPROC"] = before


def scores(results: dict) -> dict[str, float]:
    """Every numeric score of `results`, as `task/metric` (e.g. `blues_cloze/acc`)."""
    flat = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric = key.split(",")[0]  # the harness names a score `metric,filter`
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "alias":
                flat[f"{task}/{metric}"] = float(value)
    return flat


def write_results(results: dict) -> Path:
    """`results` as JSON beside its checkpoint: step-N.lm_eval/results-<UTC time>.json."""
    from lm_eval.utils import handle_non_serializable

    folder = Path(results["blues"]["checkpoint"])
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    path = folder.with_name(folder.name + RESULTS_SUFFIX) / f"results-{stamp}.json"
    write_json_atomic(path, json.loads(json.dumps(results, default=handle_non_serializable)))
    return path


def track(results: dict) -> str | None:
    """The scores logged into the MLflow run of the checkpoint's run, when it was tracked:
    the run's link (None: not tracked, nothing sent)."""
    blues = results["blues"]
    if blues["step"] is None:
        return None
    return tracking.log_evaluation(Path(blues["checkpoint"]), blues["step"], scores(results))


def table(results: dict) -> str:
    from lm_eval.utils import make_table

    text = make_table(results)
    return text + ("\n" + make_table(results, "groups") if results.get("groups") else "")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def flag_parser() -> argparse.ArgumentParser:
    p = command_line.flag_parser("blues eval", __doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (step-N) or run folder (latest checkpoint)")
    p.add_argument("--tasks", required=True, help="comma-separated harness task names")
    p.add_argument("--include_path", default=None, help="folder of extra task YAMLs (blues eval-tasks --out); default: the harness's own tasks only")
    p.add_argument("--limit", type=positive, default=None, help="score only the first N examples of each task (default: all)")
    p.add_argument("--batch_size", type=positive, default=8, help="rows per forward (scores do not depend on it)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--log_samples", action="store_true", help="keep every example's requests and scores in the JSON")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    return p


def parse_args(argv):
    p = flag_parser()
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.tasks:
        p.error("--tasks: name at least one task")
    if storage.is_remote(args.checkpoint):
        raise BluesError(f"--checkpoint {args.checkpoint}: blues eval scores a local checkpoint (its results are "
                         "written beside it); copy the checkpoint folder here first")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = evaluate(args.checkpoint, args.tasks, args.include_path, args.limit, args.batch_size, args.device,
                       args.log_samples)
    path = write_results(results)
    if args.json:
        from lm_eval.utils import handle_non_serializable

        print(json.dumps({k: v for k, v in results.items() if k != "samples"}, default=handle_non_serializable))
    else:
        print(table(results))
    print(f"results: {path}", file=sys.stderr if args.json else sys.stdout)
    link = track(results)
    if link:
        print(f"mlflow: scores logged to {link}", file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    from blues_train.io.command_line import run_command

    sys.exit(run_command(main, sys.argv[1:]))
