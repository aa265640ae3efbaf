"""`blues eval`'s two possible paths, timed on the same checkpoint and tasks in one run:

    adapter   the checkpoint loaded as BluesLM, scored by BluesHarnessLM (what `blues eval` does)
    hf        `blues export` of the checkpoint (float32), scored by the harness's own `hf` model
              (transformers' Qwen2Moe/Mixtral), as `lm_eval --model hf --model_args pretrained=EXPORT`

For each round and path: model load and `lm_eval.simple_evaluate`; the export's time once.
Prints best/median seconds, the ratio hf/adapter, and the largest difference between the two
paths' log-likelihoods of the same requests (they are the same computation; tests compare
each with Blues' training loss).

    python benchmarks/eval_paths.py --checkpoint runs/demo --include_path eval_tasks \\
        --tasks blues_cloze,blues_next_passage [--limit N] [--batch_size 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def loglikelihoods(results: dict) -> list[float]:
    """Every request's log-likelihood, in the harness's order of tasks, documents, choices."""
    out = []
    for task in sorted(results["samples"]):
        for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
            out += [float(resp[0][0]) for resp in sample["resps"]]
    return out


def timed_round(path: str, args, export_dir: Path) -> tuple[float, float, list[float]]:
    import lm_eval

    from blues_train.serving import evaluation
    from blues_train.serving.generate import checkpoint_folder, load_model

    manager = evaluation.task_manager(args.tasks, args.include_path)
    started = time.perf_counter()
    if path == "adapter":
        from blues_train.serving.lm_eval_adapter import BluesHarnessLM

        model = BluesHarnessLM(load_model(checkpoint_folder(args.checkpoint), "cpu"), args.batch_size)
    else:
        from lm_eval.models.huggingface import HFLM

        model = HFLM(pretrained=str(export_dir), dtype="float32", device="cpu", batch_size=args.batch_size)
    loaded = time.perf_counter()
    results = lm_eval.simple_evaluate(model=model, tasks=args.tasks, limit=args.limit, task_manager=manager,
                                      log_samples=True)
    return loaded - started, time.perf_counter() - loaded, loglikelihoods(results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--include_path", required=True)
    p.add_argument("--tasks", default="blues_cloze,blues_next_passage")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    args.tasks = args.tasks.split(",")

    from blues_train.serving.export import export

    with tempfile.TemporaryDirectory() as tmp:
        export_dir = Path(tmp) / "export"
        started = time.perf_counter()
        export(args.checkpoint, export_dir, dtype="float32")
        export_s = time.perf_counter() - started
        times: dict[str, list[tuple[float, float]]] = {"adapter": [], "hf": []}
        lls = {}
        for _ in range(args.rounds):
            for path in times:  # alternated, so that load from other work falls on both
                load_s, eval_s, lls[path] = timed_round(path, args, export_dir)
                times[path].append((load_s, eval_s))
    print(f"export (float32, once per checkpoint for hf): {export_s:.1f} s")
    for path, rounds in times.items():
        loads, evals = [r[0] for r in rounds], [r[1] for r in rounds]
        print(f"{path:8s} load best {min(loads):6.2f} s median {statistics.median(loads):6.2f} s | "
              f"simple_evaluate best {min(evals):6.2f} s median {statistics.median(evals):6.2f} s")
    best = {path: min(l + e for l, e in rounds) for path, rounds in times.items()}
    print(f"hf / adapter (load + evaluate, best): {best['hf'] / best['adapter']:.2f}x; "
          f"with the export: {(best['hf'] + export_s) / best['adapter']:.2f}x")
    assert len(lls["adapter"]) == len(lls["hf"])
    diff = max(abs(a - b) for a, b in zip(lls["adapter"], lls["hf"]))
    print(f"{len(lls['adapter'])} log-likelihoods; largest |adapter - hf| {diff:.2e}")


if __name__ == "__main__":
    main()
