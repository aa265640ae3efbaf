"""What a training run reports: one record per step to stdout, `OUT/metrics.jsonl`, TensorBoard.

Only rank 0 builds a `MetricsLog`. A record is a flat dict with at least `step` and
`loss`; `time` is when the step ended (unix seconds); `experts` holds one entry per MoE
layer (see `expert_utilization`).

Lineage (train.py writes them, blues_train/serving/lineage.py reads them):
- `windows`: [first, end), the global loader windows the step consumed; `layout`:
  {world_size, micro_batch, grad_accum}. Window g of the step went to rank (g - first) %
  world_size, as that rank's i-th window of the step, i = (g - first) // world_size: in
  micro-batch i // micro_batch, row i % micro_batch.
- `data` (on the first step of every start or resume): {mixture, mixture_fingerprint,
  seed, seq_len}, what the window numbers are numbers of.
- `spike` (only on a spike step, see `SpikeDetector`): {median, ratio, factor, steps,
  documents}: the step's `SPIKE_DOCUMENTS` worst documents by `document_losses`, each
  {dataset, source, sha256, index, tokens, mean_loss, max_loss}.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import deque
from pathlib import Path

from blues_train.io.atomic import os_error, write_atomic

METRICS_FILE = "metrics.jsonl"

# Dense bf16 tensor-core peak per GPU (vendor figures), the MFU denominator.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def peak_flops(device_name: str) -> float | None:
    """Peak bf16 FLOP/s of a GPU by its name, or None where it is not known (no MFU then)."""
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return flops
    return None


def expert_utilization(tokens_per_expert: list[list[float]], layers: tuple[int, ...]) -> list[dict]:
    """Per MoE layer (by block index): each expert's share of routed tokens, entropy (nats;
    log E when uniform), and max / min load (share x E; 1.0 is a perfectly balanced expert)."""
    report = []
    for layer, counts in zip(layers, tokens_per_expert):
        total = sum(counts) or 1.0
        share = [c / total for c in counts]
        n = len(share)
        report.append({
            "layer": layer,
            "share": [round(s, 5) for s in share],
            "entropy": -sum(s * math.log(s) for s in share if s > 0),
            "max_load": max(share) * n,
            "min_load": min(share) * n,
        })
    return report


SPIKE_MIN_STEPS = 5  # losses known before a step can count as a spike
SPIKE_DOCUMENTS = 5  # documents recorded with a spike


class SpikeDetector:
    """A step is a spike when its loss exceeds `factor` x the median loss of the `window`
    steps before it (once at least SPIKE_MIN_STEPS of them are known; factor 0 = never).
    Non-finite losses are neither spikes nor history. `history` (the last losses, oldest
    first) continues a resumed run exactly: checkpoints keep it."""

    def __init__(self, factor: float, window: int, history=()):
        self.factor, self.window = factor, window
        self.history: deque[float] = deque(list(history)[-window:], maxlen=window)

    def observe(self, loss: float) -> float | None:
        """Take the step's loss; the median it is a spike against, or None."""
        if not math.isfinite(loss):
            return None
        enough = self.factor > 0 and len(self.history) >= min(SPIKE_MIN_STEPS, self.window)
        median = statistics.median(self.history) if enough else None
        self.median_of = len(self.history)  # losses the median was taken over
        self.history.append(loss)
        return median if median is not None and loss > self.factor * median else None


def token_losses(model, input_ids, labels):
    """Cross-entropy of every label under `model` (a BluesLM, in whatever mode the caller
    set), [B, T] fp32 on the model's device, computed as the training loss is (final norm,
    tied head, the real vocabulary) `loss_chunk_tokens` rows at a time; no gradients. The
    final hidden states are taken from the model's own forward (a hook on its last norm),
    so no logits of the whole batch are ever held."""
    import torch

    hidden = final_hidden(model, input_ids)
    with torch.no_grad():
        h_ND, target_N = hidden.flatten(0, 1), labels.flatten()
        weight, vocab = model.embed.weight, model.config.vocab_size
        chunk = model.options.loss_chunk_tokens
        losses = torch.empty(h_ND.shape[0], dtype=torch.float32, device=h_ND.device)
        for s in range(0, h_ND.shape[0], chunk):
            logits = (h_ND[s:s + chunk] @ weight.T)[:, :vocab].float()
            target = logits.gather(1, target_N[s:s + chunk, None]).squeeze(1)
            losses[s:s + chunk] = logits.logsumexp(-1) - target
    return losses.view(labels.shape)


def final_hidden(model, input_ids):
    """[B, T, d_model]: the model's final-norm outputs (what its head reads) for `input_ids`,
    taken from its own forward by a hook, without logits of the whole batch; no gradients."""
    import torch

    hidden = []
    handle = model.norm.register_forward_hook(lambda module, args, out: hidden.append(out))
    try:
        with torch.no_grad():
            model(input_ids, last_only=True)
    finally:
        handle.remove()
    return hidden[0]


def document_losses(windows) -> list[dict]:
    """Per document, worst first: `windows` is [(pieces, losses)] with a window's
    `loader.WindowPiece`s and the seq_len losses of its labels (label t = window token
    t + 1). A label belongs to the document whose token it is; an EOT label (the end of a
    document) to the document it ends. Returns [{document: (source, chunk, row), tokens,
    mean_loss, max_loss}], sorted by mean loss, then max loss, descending."""
    totals: dict[tuple, list[float]] = {}
    for pieces, losses in windows:
        losses = [float(x) for x in losses]
        owner = [None] * (len(losses) + 1)
        for piece in pieces:
            owner[piece.window_start:piece.window_end] = [piece.document] * (piece.window_end - piece.window_start)
        for t, loss in enumerate(losses):
            document = owner[t + 1] if owner[t + 1] is not None else owner[t]
            if document is None:
                continue
            entry = totals.setdefault(document, [0, 0.0, -math.inf])
            entry[0] += 1
            entry[1] += loss
            entry[2] = max(entry[2], loss)
    result = [{"document": key, "tokens": n, "mean_loss": total / n, "max_loss": worst}
              for key, (n, total, worst) in totals.items()]
    return sorted(result, key=lambda d: (-d["mean_loss"], -d["max_loss"], d["document"]))


def keep_until(out_dir, step: int) -> None:
    """Drop records after `step` from metrics.jsonl: a resumed run rewrites those steps."""
    path = Path(out_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if _step_of(line) <= step]
    write_atomic(path, "".join(line + "\n" for line in kept).encode())


def keep_copy(out_dir, folder) -> None:
    """Copy metrics.jsonl as it stands into `folder`, where a resume set checkpoints aside:
    they keep the records that `keep_until` is about to drop."""
    path = Path(out_dir) / METRICS_FILE
    if path.exists():
        write_atomic(Path(folder) / METRICS_FILE, path.read_bytes())


def _step_of(line: str) -> float:
    """The step of a metrics line; a torn line (the run died mid-write) counts as after any step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class MetricsLog:
    """Rank 0's sink for step records; its lines say how far the run is and when it should end
    (the mean time of this start's steps so far, evaluations and checkpoints included)."""

    def __init__(self, out_dir, start_step: int = 0, max_steps: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.start_step, self.max_steps, self.started = start_step, max_steps, time.time()
        self.out_dir = Path(out_dir)
        self.jsonl = open(self.out_dir / METRICS_FILE, "a")
        # purge_step drops the events a resumed run is about to write again
        self.tensorboard = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=start_step + 1)

    def write(self, record: dict) -> str:
        """Record a step; returns the human line it printed."""
        try:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        except OSError as exc:  # a torn last line is dropped on resume (keep_until)
            raise os_error(exc, self.out_dir / METRICS_FILE) from None
        for key, value in scalars(record).items():
            self.tensorboard.add_scalar(key, value, record["step"])
        line = format_line(record, self.max_steps, self.eta(record))
        print(line, flush=True)
        return line

    def eta(self, record: dict) -> float | None:
        """Seconds left until max_steps, at the pace of this start's steps so far."""
        done = record["step"] - self.start_step
        if self.max_steps is None or "time" not in record or done < 1 or record["step"] >= self.max_steps:
            return None
        return (record["time"] - self.started) / done * (self.max_steps - record["step"])

    def close(self) -> None:
        self.jsonl.close()
        self.tensorboard.close()


def scalars(record: dict) -> dict[str, float]:
    """The plotted figures of a step record: its numbers (not the step or the wall-clock time)
    and each MoE layer's `experts/layer<N>/entropy`, `max_load` and `min_load` (TensorBoard and
    MLflow alike)."""
    figures = {key: value for key, value in record.items()
               if key not in ("step", "time") and isinstance(value, (int, float))}
    for layer in record.get("experts", []):
        for key in ("entropy", "max_load", "min_load"):
            figures[f"experts/layer{layer['layer']}/{key}"] = layer[key]
    return figures


def format_line(record: dict, max_steps: int | None = None, eta: float | None = None) -> str:
    """One human line: `step 10/120 | loss 9.2113 | lr 3.00e-04 | ... | ETA 2m10s`."""
    parts = [f"step {record['step']}" + (f"/{max_steps}" if max_steps else "")]
    for key in ("loss", "val_loss", "val_perplexity", "aux_loss", "z_loss", "grad_norm"):
        if key in record:
            parts.append(f"{key} {record[key]:.4f}")
    if "lr" in record:
        parts.append(f"lr {record['lr']:.2e}")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if "mfu" in record:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    if record.get("experts"):
        worst = max(layer["max_load"] for layer in record["experts"])
        parts.append(f"max expert load {worst:.2f}")
    if record.get("spike"):
        parts.append(f"SPIKE {record['spike']['ratio']:.2f}x the median (blues lineage --step {record['step']})")
    if eta is not None:
        parts.append(f"ETA {duration(eta)}")
    return " | ".join(parts)


def duration(seconds: float) -> str:
    """`42s`, `2m10s`, `3h05m`, `2d04h`: a duration at a glance."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
