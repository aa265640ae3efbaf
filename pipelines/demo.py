"""`make demo` (`python -m pipelines.demo`): the whole Blues asset graph on the sample corpus, on the CPU.

Writes the sample corpus, then materializes, through Dagster and in this process,
raw corpora -> tokenized_dataset/<dataset> (one asset per dataset) -> merged_dataset ->
trained_model (the tiny model) -> model_checkpoint, model_eval, with every blocking check,
then exports the last checkpoint for transformers (`exports/demo`) and says what to try next.
The runs are recorded in the project-local DAGSTER_HOME, so `make dev` shows them after.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from blues_train.data.sample_corpus import write_sample_corpus
from blues_train.serving.export import export
from blues_train.serving.report import read_metrics

QUIET_RUN = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config.json", help="project configuration (default config.json)")
    parser.add_argument("--corpus", default="sample_corpus",
                        help="where to write the sample corpus, relative to the config's folder")
    parser.add_argument("--corpus_mb", type=float, default=2.0, help="MB of text per dataset")
    parser.add_argument("--max_steps", type=int, help="training steps (default: the config's)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    config_path = Path(args.config).resolve()
    os.environ["BLUES_CONFIG"] = str(config_path)
    os.environ.setdefault("DAGSTER_HOME", str(config_path.parent / ".dagster_home"))

    import warnings

    import dagster as dg

    warnings.filterwarnings("ignore", category=dg.PreviewWarning)  # raised inside Dagster Pipes
    from pipelines.config import load_project_config
    from pipelines.definitions import defs
    from pipelines.home import ensure_dagster_home

    started = time.perf_counter()
    corpus = write_sample_corpus(config_path.parent / args.corpus, args.corpus_mb)
    print(f"sample corpus: {', '.join(corpus)} under {config_path.parent / args.corpus}")
    config = load_project_config(config_path)  # its inputs must exist: after the corpus

    ensure_dagster_home(Path(os.environ["DAGSTER_HOME"]))
    train_config = {"max_steps": args.max_steps} if args.max_steps else {}
    result = defs().resolve_implicit_global_asset_job_def().execute_in_process(
        instance=dg.DagsterInstance.get(),
        run_config={**QUIET_RUN, "ops": {"trained_model": {"config": train_config}}},
    )

    print("\n== tokenized_dataset (one asset per dataset)")
    print(f"{'dataset':<10} {'documents':>10} {'tokens':>12} {'bytes/token':>12} "
          f"{'compression':>12} {'skipped':>8}")
    for source in config.datasets:
        m = _metadata(result, f"tokenized_dataset/{source.name}")
        print(f"{source.name:<10} {m['documents']:>10,} {m['tokens']:>12,} {m['input_bytes_per_token']:>12.2f} "
              f"{m['compression']:>11.2f}x {m['skipped']:>8,}")

    mixture = _metadata(result, "merged_dataset")
    print(f"\n== merged_dataset ({mixture['strategy']}, {mixture['total_tokens']:,} tokens, "
          f"fingerprint {mixture['fingerprint'][:16]})")
    print(f"{'dataset':<10} {'target':>8} {'realized':>9} {'tokens':>12} {'repeat':>7}")
    for row in mixture["shares"].records:
        r = row.data
        print(f"{r['dataset']:<10} {r['target_share']:>8.4f} {r['realized_share']:>9.4f} "
              f"{r['tokens']:>12,} {r['repeat']:>7.2f}")

    model = _metadata(result, "trained_model")
    records = read_metrics(model["run_dir"])
    val = [r for r in records if "val_loss" in r]
    print(f"\n== trained_model ({len(records)} steps, {model['checkpoints']} checkpoint(s) "
          f"recorded as model_checkpoint partitions)")
    print(f"train loss {records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}"
          + (f"; validation loss {val[-1]['val_loss']:.3f} at step {val[-1]['step']}" if val else ""))

    evaluation = _metadata(result, "model_eval")
    print(f"\n== model_eval\nheld-out perplexity {evaluation['perplexity']:.1f} "
          f"(val loss {evaluation['val_loss']:.3f}); expert load max {evaluation['max_expert_load']:.2f} "
          f"min {evaluation['min_expert_load']:.2f} (1.0 = balanced)")
    print_markdown(evaluation["samples"])

    exported = export(model["run_dir"], config_path.parent / "exports" / "demo")
    print(f"\n== export\n{exported['path']}: the last checkpoint for transformers, with its model card (README.md)")

    print(f"\ndone in {time.perf_counter() - started:.0f} s; runs recorded in {os.environ['DAGSTER_HOME']}")
    print(next_steps(model["run_dir"], exported["path"]))
    return 0


def next_steps(run_dir, exported) -> str:
    """What to try next, on the command line and in the UI."""
    return "\n".join([
        "Next, on the command line:",
        f'  .venv/bin/blues generate --checkpoint {run_dir} --prompt "def " --max_length 40',
        f"  .venv/bin/blues lineage --run {run_dir} --step 1   (the documents that step trained on)",
        f"  python -c \"import transformers; transformers.AutoModelForCausalLM.from_pretrained('{exported}')\"",
        "In the UI: `make dev`, then http://127.0.0.1:3000: Catalog lists the assets (each asset's Plots tab "
        "draws loss and perplexity across checkpoints), Lineage draws the graph, Runs holds this demo's runs.",
    ])


def print_markdown(text: str) -> None:
    """Markdown metadata as a terminal shows it (rich, which Dagster depends on; plain text
    when stdout is not a terminal)."""
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(text))


def _metadata(result, asset: str) -> dict:
    """The metadata of `asset`'s materialization in `result`, as plain values."""
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    metadata = event.step_materialization_data.materialization.metadata
    return {key: getattr(value, "value", value) for key, value in metadata.items()}


if __name__ == "__main__":
    from blues_train.io.command_line import run_command

    sys.exit(run_command(main, sys.argv[1:]))
