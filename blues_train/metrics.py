"""What a training run reports: one record per step to stdout, `OUT/metrics.jsonl`, TensorBoard.

Only rank 0 builds a `MetricsLog`. A record is a flat dict with at least `step` and
`loss`; `experts` holds one entry per MoE layer (see `expert_utilization`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from blues_train.atomic import os_error, write_atomic

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


def keep_until(out_dir, step: int) -> None:
    """Drop records after `step` from metrics.jsonl: a resumed run rewrites those steps."""
    path = Path(out_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if _step_of(line) <= step]
    write_atomic(path, "".join(line + "\n" for line in kept).encode())


def _step_of(line: str) -> float:
    """The step of a metrics line; a torn line (the run died mid-write) counts as after any step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class MetricsLog:
    """Rank 0's sink for step records."""

    def __init__(self, out_dir, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir = Path(out_dir)
        self.jsonl = open(self.out_dir / METRICS_FILE, "a")
        # purge_step drops the events a resumed run is about to write again
        self.tensorboard = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=start_step + 1)

    def write(self, record: dict) -> None:
        try:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        except OSError as exc:  # a torn last line is dropped on resume (keep_until)
            raise os_error(exc, self.out_dir / METRICS_FILE) from None
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, step)
        for layer in record.get("experts", []):
            for key in ("entropy", "max_load", "min_load"):
                self.tensorboard.add_scalar(f"experts/layer{layer['layer']}/{key}", layer[key], step)
        print(format_line(record), flush=True)

    def close(self) -> None:
        self.jsonl.close()
        self.tensorboard.close()


def format_line(record: dict) -> str:
    """One human line: `step 10 | loss 9.2113 | lr 3.00e-04 | ...`."""
    parts = [f"step {record['step']}"]
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
    return " | ".join(parts)
