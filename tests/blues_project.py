"""A small real Blues project for the Dagster tests: the sample corpus (a fraction of a
MB per dataset), a project configuration pointing at it, small training settings (the model of
training_runs.py)."""

import json
from pathlib import Path

from training_runs import MODEL

from blues_train.data.sample_corpus import write_sample_corpus

TRAINING = {"model": MODEL, "max_steps": 2, "seq_len": 64, "global_batch_tokens": 256,
            "save_interval": 1, "eval_interval": 2, "args": ["--eval_sequences", "4"]}


def write_project(root: Path, corpus_mb: float = 0.15) -> Path:
    """Write the corpus and `root/config.json`; return the config's path."""
    write_sample_corpus(root / "corpus", corpus_mb)
    config = {
        "datasets": {"paths": ["stores/code", "stores/prose"], "weights": [0.3, 0.7],
                     "merge_strategy": "weighted"},
        "sources": [
            {"name": "code", "input": "corpus/code", "glob": "**/*.jsonl.zst"},
            {"name": "prose", "input": "corpus/prose", "glob": "**/*"},
        ],
        "mixture": {"output": "stores/merged", "val_fraction": 0.05},
        "training": {**TRAINING, "out": "runs"},
        "evaluation": {"prompts": ["def "], "max_length": 8, "val_windows": 2},
        "schedule": {"retrain_cron": "15 4 * * 1"},
    }
    path = root / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path
