"""`blues eval` on a checkpoint: the Blues adapter against the harness's HF model on the export.

Scores the same local tasks (`blues eval-tasks` output) with --limit examples per task, twice:
(a) what `blues eval` runs, `blues_train.serving.evaluation.evaluate` (the Blues adapter on
the checkpoint's weights), and (b) lm-evaluation-harness's own `hf` model on `blues export`
of the same checkpoint, in the same dtype (float32: the checkpoint's). Reports wall seconds
and requests/s of each (model loading apart), the scores, and the largest difference of
per-request log-likelihoods between the two (they score the same weights). The harness's
`hf` model needs `accelerate` (`pip install accelerate`), which Blues itself does not use.

    blues eval-tasks --mixture MIX --out TASKS
    python benchmarks/eval_throughput.py --checkpoint RUN --include_path TASKS --limit 1000 \
        --batch_size 32 --out benchmarks/results/eval_h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from blues_train.serving import evaluation, export
from blues_train.serving.generate import checkpoint_folder, load_model

TASKS = "blues_cloze,blues_next_passage"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def loglikelihoods(results: dict) -> dict[tuple[str, int, int], float]:
    """(task, doc id, request index) -> the log-likelihood each logged request got."""
    found = {}
    for task, samples in results["samples"].items():
        for sample in samples:
            for index, response in enumerate(sample["filtered_resps"]):
                found[(task, sample["doc_id"], index)] = float(response[0])
    return found


def run_blues(args, tasks: list[str]) -> tuple[dict, float]:
    started = time.perf_counter()
    results = evaluation.evaluate(args.checkpoint, tasks, args.include_path, args.limit, args.batch_size,
                                  log_samples=True)
    sync()
    return results, time.perf_counter() - started


def run_hf(args, tasks: list[str], folder: Path) -> tuple[dict, float, float]:
    import lm_eval

    manager = evaluation.task_manager(tasks, args.include_path)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export"
        export.write_export(load_model(folder, "cpu"), out, dtype="float32")
        exported = time.perf_counter() - started
        device = "cuda" if torch.cuda.is_available() else "cpu"
        started = time.perf_counter()
        results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out},dtype=float32",
                                          tasks=tasks, limit=args.limit, batch_size=args.batch_size,
                                          device=device, task_manager=manager, log_samples=True)
        sync()
        return results, time.perf_counter() - started, exported


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="run folder or step-N checkpoint")
    p.add_argument("--include_path", required=True, help="blues eval-tasks --out folder")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)
    tasks = args.tasks.split(",")
    folder = checkpoint_folder(args.checkpoint)
    blues, blues_seconds = run_blues(args, tasks)
    hf, hf_seconds, export_seconds = run_hf(args, tasks, folder)
    ours, theirs = loglikelihoods(blues), loglikelihoods(hf)
    common = ours.keys() & theirs.keys()
    requests = len(ours)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__, "checkpoint": str(folder), "tasks": tasks, "limit": args.limit,
        "batch_size": args.batch_size, "requests": requests,
        "examples": {t: len(s) for t, s in blues["samples"].items()},
        "blues_adapter": {"seconds": blues_seconds, "inside_harness_seconds": blues["blues"]["seconds"],
                          "requests_per_s": requests / blues["blues"]["seconds"],
                          "scores": evaluation.scores(blues)},
        "hf_export": {"seconds": hf_seconds, "export_seconds": export_seconds,
                      "requests_per_s": len(theirs) / hf_seconds, "scores": evaluation.scores(hf)},
        "compared_requests": len(common),
        "max_abs_loglikelihood_difference": max((abs(ours[k] - theirs[k]) for k in common), default=None),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
