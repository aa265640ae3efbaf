"""`blues lineage`: the documents of a training step, those its loss spiked on, a document's steps.

    blues lineage --run runs/demo --step 60                      # windows and their documents
    blues lineage --run runs/demo --step 60 --loss --checkpoint runs/demo/checkpoints/step-000060
    blues lineage --run runs/demo --document code/stdlib.jsonl.zst:17   # or why it was in none
    blues lineage --run runs/demo --spikes                       # the spikes training recorded
    (--json: the same as one JSON object)

Nothing is re-derived by hope. Training records in OUT/metrics.jsonl which global loader
windows each step consumed and how they were dealt (`windows`, `layout`), and on the first
step of every start or resume what they are windows of (`data`: mixture, seed, seq_len;
blues_train/training/metrics.py). The loader rebuilds the same deterministic plan and maps a window
number to the documents it holds (`PackedSequenceDataset.window_pieces`), reading only the
`source` and `index` columns of the chunks involved; the window's rank and micro-batch
follow from the layout. `--loss` scores the step's windows under a checkpoint (eval mode,
per-token cross-entropy) and ranks the documents by their mean loss: under the step's own
checkpoint that is what training recorded for a spike step.

A metrics.jsonl line is read only if it is what training writes (`StepRecord`, and each
step's windows the ones its layout deals after the steps before: so a query's work is
bounded by the run's own size); any other is refused as FILE:LINE, a torn last line skipped.
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from blues_train.data import tokenizer
from blues_train.io import command_line, storage
from blues_train.io.errors import BluesError
from blues_train.io.settings import error_line
from blues_train.mixture import dedup
from blues_train.mixture.loader import PackedSequenceDataset
from blues_train.mixture.spec import held_out, read_mixture
from blues_train.training import metrics
from blues_train.training.config import TrainingConfig

PREVIEW_CHARS = 60
SCORE_BATCH = 8  # windows per forward under --loss


class Layout(BaseModel):
    model_config = ConfigDict(strict=True)
    world_size: int = Field(ge=1)
    micro_batch: int = Field(ge=1)
    grad_accum: int = Field(ge=1)


class RunData(BaseModel):
    model_config = ConfigDict(strict=True)
    mixture: str
    mixture_fingerprint: str
    seed: int = Field(ge=0)
    seq_len: int = Field(ge=1)


class StepRecord(BaseModel):
    """The fields of a metrics.jsonl record that lineage reads (metrics.py); the others pass."""
    model_config = ConfigDict(strict=True, extra="allow")
    step: int = Field(ge=1)
    loss: float
    windows: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)] | None = None
    layout: Layout | None = None
    data: RunData | None = None


REPAIR = "restore the file, or delete the line (its step is then unknown to lineage)"


def read_records(run_dir) -> list[dict]:
    """The step records of `run_dir/metrics.jsonl`, by step (a torn last line is skipped);
    a BluesError naming the file and line of any other that is not a record training wrote."""
    path = storage.path(run_dir) / metrics.METRICS_FILE
    if not path.is_file():
        raise BluesError(f"{path}: no metrics; --run must be the --out folder of a training run")
    lines = path.read_bytes().split(b"\n")
    records, last = {}, max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError as exc:
            if number == last:
                break  # torn: the run died mid-write
            raise BluesError(f"{path}:{number}: not a JSON record ({exc}); {REPAIR}") from None
        try:
            StepRecord.model_validate(raw)
        except ValidationError as exc:
            raise BluesError(f"{path}:{number}: {error_line(exc, StepRecord)}; {REPAIR}") from None
        records[raw["step"]] = (number, raw)
    ordered = [records[step] for step in sorted(records)]
    check_windows(ordered, path)
    return [raw for _, raw in ordered]


def check_windows(numbered: list[tuple[int, dict]], path) -> None:
    """Each step's windows are the count its layout deals, right after those of the steps
    before (window numbers count from 0 at step 1): what bounds the work of a lineage query."""
    previous = (0, 0)  # (step, end of its windows)
    for number, record in numbered:
        if "windows" not in record:
            continue
        if "layout" not in record:
            raise BluesError(f"{path}:{number}: windows without a layout; {REPAIR}")
        layout = record["layout"]
        count = layout["world_size"] * layout["micro_batch"] * layout["grad_accum"]
        first = previous[1] + (record["step"] - previous[0] - 1) * count
        if record["windows"] != [first, first + count]:
            raise BluesError(f"{path}:{number}: windows {record['windows']} are not [{first}, {first + count}), the "
                             f"{count} windows its layout deals after those of the steps before; {REPAIR}")
        previous = (record["step"], first + count)


def find_step(records: list[dict], step: int, run_dir) -> dict:
    by_step = {r["step"]: r for r in records}
    if step not in by_step:
        known = f"steps {records[0]['step']}-{records[-1]['step']}" if records else "no steps"
        raise BluesError(f"--step {step}: {storage.path(run_dir) / metrics.METRICS_FILE} records {known}")
    record = by_step[step]
    if "windows" not in record:
        raise BluesError(f"--step {step}: {storage.path(run_dir) / metrics.METRICS_FILE} records no windows for it "
                         "(trained by a Blues that did not record lineage)")
    return record


def data_of(records: list[dict], step: int) -> dict:
    """The `data` (mixture, seed, seq_len) in force at `step`: that of the start it belongs to."""
    data = None
    for record in records:
        if record["step"] > step:
            break
        data = record.get("data", data)
    if data is None:
        raise BluesError(f"step {step}: no record up to it says which mixture, seed and seq_len the run "
                         "used (trained by a Blues that did not record lineage)")
    return data


def open_stream(data: dict, mixture=None, index_cache_dir=None) -> PackedSequenceDataset:
    """The run's training stream: the loader that dealt its windows, on its cached index."""
    path = mixture or data["mixture"]
    found = read_mixture(path)["fingerprint"]
    if found != data["mixture_fingerprint"]:
        raise BluesError(f"{path}: mixture {found[:16]} is not the {data['mixture_fingerprint'][:16]} the run "
                         "trained on (merged again since?); pass --mixture with the run's mixture folder")
    return PackedSequenceDataset(path, data["seq_len"], seed=data["seed"], index_cache_dir=index_cache_dir)


def slot(record: dict, window: int) -> dict:
    """Where global window `window` of a step went: rank, micro-batch, row in it."""
    first, layout = record["windows"][0], record["layout"]
    offset = window - first
    i = offset // layout["world_size"]
    return {"rank": offset % layout["world_size"], "micro_batch": i // layout["micro_batch"],
            "row": i % layout["micro_batch"]}


def preview(ids) -> str:
    """The first PREVIEW_CHARS characters of the tokens' text."""
    text = tokenizer.decode(int(t) for t in ids)
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS - 1] + "…"


def step_lineage(stream: PackedSequenceDataset, record: dict, model=None) -> dict:
    """A step's windows and the documents each holds; with `model` (a BluesLM) also every
    document's losses over the step, worst first."""
    first, end = record["windows"]
    windows, names, scored = [], {}, []
    for window in range(first, end):
        pieces = stream.window_pieces(window)
        tokens = stream.window_tokens(window)
        epoch, in_pass = stream.window_position(window)
        for piece, name in zip(pieces, stream.document_ids(pieces)):
            names.setdefault(piece.document, (name, preview(tokens[piece.window_start:piece.window_end])))
        windows.append({"window": window, "pass": epoch, "window_in_pass": in_pass, **slot(record, window),
                        "pieces": [{**names[p.document][0].to_dict(), "doc_tokens": [p.doc_start, p.doc_end],
                                    "doc_length": p.doc_length, "window_tokens": [p.window_start, p.window_end],
                                    "preview": preview(tokens[p.window_start:p.window_end])} for p in pieces]})
        scored.append((pieces, tokens))
    report = {"step": record["step"], "loss": record.get("loss"), "windows": windows,
              "window_range": [first, end], "layout": record["layout"], "spike": record.get("spike")}
    if model is not None:
        losses = score(model, np.stack([tokens for _, tokens in scored]))
        ranked = metrics.document_losses([(pieces, row) for (pieces, _), row in zip(scored, losses)])
        report["documents"] = [{**names[d["document"]][0].to_dict(), "tokens": d["tokens"],
                                "mean_loss": d["mean_loss"], "max_loss": d["max_loss"],
                                "preview": names[d["document"]][1]} for d in ranked]
    return report


def score(model, windows: np.ndarray) -> list[list[float]]:
    """Per-label losses of windows ([n, seq_len + 1] token ids) under `model`, in eval mode."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    rows = []
    for s in range(0, len(windows), SCORE_BATCH):
        batch = torch.from_numpy(windows[s:s + SCORE_BATCH].astype(np.int64)).to(device)
        rows += metrics.token_losses(model, batch[:, :-1], batch[:, 1:]).cpu().tolist()
    return rows


def parse_document(spec: str) -> tuple[str, int]:
    source, sep, index = spec.rpartition(":")
    if not sep or not source or not index.isdigit():
        raise BluesError(f"--document {spec!r}: give SOURCE:INDEX, the raw file as its store lists it "
                         "(or its sha256) and the record's 0-based index in it, e.g. code/stdlib.jsonl.zst:17")
    return source, int(index)


def document_lineage(stream: PackedSequenceDataset, records: list[dict], data: dict, source_file: str,
                     index: int) -> dict:
    """Every recorded step (of the run's `data`) whose windows held part of the document."""
    key = stream.find_document(source_file, index)
    name = stream.document_ids([key])[0]
    length = stream.document_length(key)
    mine, current = [], None
    for record in records:  # the steps of this data: every start's records, from its `data` on
        current = record.get("data", current)
        if "windows" in record and current is not None and same_data(current, data):
            mine.append(record)
    report = {"document": {**name.to_dict(), "chunk": stream.chunk_paths[key[1]].name, "row": key[2],
                           "tokens": length},
              "appearances": [], "steps": [], "epochs": [],
              "recorded_steps": [mine[0]["step"], mine[-1]["step"]] if mine else None}
    if length is None:
        report["removed"] = removal(stream.mixture, key[0], name)
        report["not_trained"] = not_trained_reason(stream.mixture, name, report["removed"])
        return report
    starts = [r["windows"][0] for r in mine]
    end = max((r["windows"][1] for r in mine), default=0)
    for hit in stream.document_windows(key, end):
        at = bisect.bisect_right(starts, hit.window) - 1
        if at < 0 or hit.window >= mine[at]["windows"][1]:
            continue  # a window of a step this metrics.jsonl does not record
        record = mine[at]
        report["appearances"].append({"step": record["step"], "epoch": hit.epoch, "window": hit.window,
                                      "window_in_pass": hit.window_in_pass, **slot(record, hit.window),
                                      "doc_tokens": [hit.doc_start, hit.doc_end],
                                      "window_tokens": [hit.window_start, hit.window_end]})
    report["steps"] = sorted({a["step"] for a in report["appearances"]})
    report["epochs"] = sorted({a["epoch"] for a in report["appearances"]})
    return report


def removal(mixture: dict, source: int, name) -> dict | None:
    """Why the mixture's dedup result removed document `name` of mixture source `source`:
    reason, estimated Jaccard, the kept document and the result folder; None if it did not."""
    row = dedup.removal_of(mixture, mixture["sources"][source]["fingerprint"], name.source, name.index)
    if row is None:
        return None
    return {"reason": row["reason"], "jaccard": row["jaccard"], "dedup": mixture["dedup"]["path"],
            "kept": {"dataset": row["kept_dataset"], "source": row["kept_source"], "sha256": row["kept_sha256"],
                     "index": row["kept_index"]}}


def not_trained_reason(mixture: dict, name, removed: dict | None) -> str:
    if removed:
        kept = removed["kept"]
        return (f"removed by the dedup result {removed['dedup']}: {removed['reason']} duplicate of "
                f"{document_name(kept)} of {kept['dataset']} (estimated Jaccard {removed['jaccard']:.2f})")
    fraction = mixture["validation"]["fraction"]
    held = bool(held_out(name.sha256, np.array([name.index]), fraction)[0]) if name.sha256 else False
    return "held out for validation by the mixture's rule" if held else "empty: no tokens to train on"


def same_data(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("mixture_fingerprint", "seed", "seq_len"))


def spikes(run_dir) -> list[dict]:
    """The spikes a run recorded (metrics.jsonl `spike`), as [{step, loss, median, ratio,
    documents}] in step order: what the trained_model asset shows."""
    return [{"step": r["step"], "loss": r["loss"], **r["spike"]} for r in read_records(run_dir) if r.get("spike")]


def explain_command(run_dir, step: int, checkpoint=None) -> str:
    """The command that lists a step's documents (by loss under `checkpoint`, if given)."""
    command = f"blues lineage --run {run_dir} --step {step}"
    return command + (f" --loss --checkpoint {checkpoint}" if checkpoint else "")


def spike_rows(run_dir, checkpoint=None, top: int = 3) -> list[dict]:
    """One flat row per recorded spike (the trained_model asset's table): step, loss,
    median, ratio, its `top` worst documents as text, and the command that explains it."""
    return [{"step": spike["step"], "loss": round(spike["loss"], 4), "median": round(spike["median"], 4),
             "ratio": round(spike["ratio"], 3),
             "top_documents": "; ".join(f"{dataset_name(d['dataset'])} {document_name(d)} "
                                        f"(mean loss {d['mean_loss']:.2f} over {d['tokens']} tokens)"
                                        for d in spike["documents"][:top]),
             "explain": explain_command(run_dir, spike["step"], checkpoint)}
            for spike in spikes(run_dir)]


# ---- the command line ----

def dataset_name(path: str) -> str:
    return storage.path(path).name


def quoted(text: str) -> str:
    """A preview on one line: quoted, newlines and control characters escaped."""
    return json.dumps(text, ensure_ascii=False)


def document_name(doc: dict) -> str:
    return f"{doc['source']}:{doc['index']}"


def format_step(report: dict, run_dir, data: dict) -> str:
    first, end = report["window_range"]
    layout = report["layout"]
    lines = [f"step {report['step']} of {run_dir}: loss {report['loss']:.4f}; global windows [{first}, {end}) = "
             f"{layout['world_size']} rank(s) x micro-batch {layout['micro_batch']} x grad_accum "
             f"{layout['grad_accum']}; seq_len {data['seq_len']}, seed {data['seed']}",
             f"mixture {data['mixture']} ({data['mixture_fingerprint'][:16]})"]
    if report.get("spike"):
        spike = report["spike"]
        lines.append(f"spike: loss {spike['ratio']:.2f}x the median {spike['median']:.4f} of the {spike['steps']} "
                     f"steps before (factor {spike['factor']})")
    for window in report["windows"]:
        lines += ["", f"window {window['window']} (window {window['window_in_pass']} of pass {window['pass']}): "
                      f"rank {window['rank']}, micro-batch {window['micro_batch']}, row {window['row']}"]
        for p in window["pieces"]:
            a, b = p["window_tokens"]
            lines.append(f"  [{a:>4}, {b:>4})  {dataset_name(p['dataset'])}  {document_name(p)}  tokens "
                         f"[{p['doc_tokens'][0]}, {p['doc_tokens'][1]}) of {p['doc_length']}  sha256 "
                         f"{p['sha256'][:12]}  {quoted(p['preview'])}")
    if "documents" in report:
        lines += ["", f"documents by mean loss under {report['checkpoint']} (over the labels each holds; "
                      "an EOT counts for the document it ends):",
                  f"  {'mean':>7} {'max':>7} {'tokens':>6}  document"]
        for d in report["documents"]:
            lines.append(f"  {d['mean_loss']:7.3f} {d['max_loss']:7.3f} {d['tokens']:6d}  {dataset_name(d['dataset'])}  "
                         f"{document_name(d)}  {quoted(d['preview'])}")
    return "\n".join(lines)


def format_document(report: dict, run_dir) -> str:
    doc = report["document"]
    head = (f"document {document_name(doc)} of {doc['dataset']} (sha256 {doc['sha256'][:12]}, "
            f"{doc['chunk']} row {doc['row']}, {doc['tokens'] if doc['tokens'] is not None else 0} tokens)")
    if report.get("not_trained"):
        return f"{head}: {report['not_trained']}; in no step of {run_dir}"
    recorded = report["recorded_steps"]
    span = f"steps {recorded[0]}-{recorded[1]}" if recorded else "no steps"
    if not report["appearances"]:
        return f"{head}: in none of the {span} {run_dir} records"
    lines = [f"{head}: in {len(report['steps'])} of the {span} {run_dir} records, "
             f"pass(es) {', '.join(map(str, report['epochs']))}"]
    for a in report["appearances"]:
        lines.append(f"  step {a['step']:>6}  pass {a['epoch']}  window {a['window']} (rank {a['rank']}, "
                     f"micro-batch {a['micro_batch']}, row {a['row']})  tokens [{a['doc_tokens'][0]}, "
                     f"{a['doc_tokens'][1]}) at [{a['window_tokens'][0]}, {a['window_tokens'][1]})")
    return "\n".join(lines)


def format_spikes(found: list[dict], run_dir) -> str:
    if not found:
        return f"{run_dir}: no spikes recorded"
    lines = []
    for spike in found:
        worst = ", ".join(f"{document_name(d)} ({d['mean_loss']:.2f})" for d in spike["documents"][:3])
        lines.append(f"step {spike['step']}: loss {spike['loss']:.4f} = {spike['ratio']:.2f}x the median; "
                     f"worst: {worst}")
    return "\n".join(lines)


def flag_parser() -> argparse.ArgumentParser:
    p = command_line.flag_parser("blues lineage", __doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="the run folder (blues train --out)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--step", type=int, help="optimizer step: its windows and their documents (default: none; "
                      "one of --step, --document, --spikes)")
    what.add_argument("--document", metavar="SOURCE:INDEX",
                      help="raw file (as its store lists it, or its sha256) and record index: the steps it was in "
                           "(default: none)")
    what.add_argument("--spikes", action="store_true", help="the spikes training recorded, with their worst documents")
    p.add_argument("--loss", action="store_true", help="with --step: each document's loss under --checkpoint")
    p.add_argument("--checkpoint", help="checkpoint folder (step-N) or run folder (its latest checkpoint); "
                   "default: none, needed by --loss")
    p.add_argument("--top", type=int, default=0, help="with --loss: list only the N worst documents (0 = all)")
    p.add_argument("--mixture", help="the run's mixture folder, if it moved since training (default: the one "
                   "the run recorded)")
    p.add_argument("--index_cache_dir", default=None,
                   help=TrainingConfig.model_fields["index_cache_dir"].description)
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="for --loss; default: cuda when available")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def parse_args(argv):
    args = flag_parser().parse_args(argv)
    if args.loss and not args.checkpoint:
        raise BluesError("--loss needs --checkpoint: the checkpoint to score the step's windows under")
    if (args.loss or args.checkpoint) and args.step is None:
        raise BluesError("--loss and --checkpoint go with --step")
    if args.top < 0:
        raise BluesError(f"--top must be >= 0, got {args.top}")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.spikes:
        found = spikes(args.run)
        print(json.dumps({"run": str(args.run), "spikes": found}, indent=1) if args.json
              else format_spikes(found, args.run))
        return 0
    records = read_records(args.run)
    if args.step is not None:
        record = find_step(records, args.step, args.run)
        data = data_of(records, args.step)
        stream = open_stream(data, args.mixture, args.index_cache_dir)
        model = None
        if args.loss:
            from blues_train.serving.generate import checkpoint_folder, load_model

            model = load_model(args.checkpoint, args.device)
        report = step_lineage(stream, record, model)
        report.update(run=str(args.run), data=data)
        if model is not None:
            report["checkpoint"] = (args.checkpoint if storage.is_remote(args.checkpoint)
                                    else str(checkpoint_folder(args.checkpoint)))
            report["documents"] = report["documents"][:args.top or None]
        print(json.dumps(report, indent=1, ensure_ascii=False) if args.json else format_step(report, args.run, data))
        return 0
    if not records:
        raise BluesError(f"{storage.path(args.run) / metrics.METRICS_FILE}: records no steps")
    source_file, index = parse_document(args.document)
    data = data_of(records, records[-1]["step"])
    report = document_lineage(open_stream(data, args.mixture, args.index_cache_dir), records, data, source_file, index)
    report["run"] = str(args.run)
    print(json.dumps(report, indent=1, ensure_ascii=False) if args.json else format_document(report, args.run))
    return 0


if __name__ == "__main__":
    from blues_train.io.command_line import run_command

    sys.exit(run_command(main, sys.argv[1:]))
