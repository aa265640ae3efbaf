"""Figures about a training run and a checkpoint: the loss curve, held-out perplexity,
sample generations and expert utilization, with plots as PNG bytes.

Used by the Dagster assets and the demo; no Dagster here.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import math

from blues_train.io import storage
from blues_train.io.errors import BluesError
from blues_train.training.metrics import METRICS_FILE, expert_utilization


def read_metrics(run_dir) -> list[dict]:
    """The step records of `run_dir/metrics.jsonl` (`run_dir` a folder or a URI)."""
    path = storage.path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise BluesError(f"{path}: no metrics; did the training run start?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curve_png(run_dir) -> bytes:
    """Training loss per step, and validation loss where it was measured."""
    records = read_metrics(run_dir)
    fig, ax = _figure()
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss")
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    return _png(fig)


def expert_utilization_png(layers: list[dict]) -> bytes:
    """Each MoE layer's share of tokens per expert (uniform = 1 / n_experts); `layers` as
    `metrics.expert_utilization` returns them."""
    import numpy as np

    shares = np.array([layer["share"] for layer in layers])
    fig, ax = _figure()
    image = ax.imshow(shares, cmap="viridis", aspect="auto", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("block (MoE layers)")
    ax.set_xticks(range(shares.shape[1]))
    ax.set_yticks(range(shares.shape[0]), [str(layer["layer"]) for layer in layers])
    for (row, col), share in np.ndenumerate(shares):
        ax.text(col, row, f"{share:.2f}", ha="center", va="center", fontsize=8,
                color="black" if share > 0.6 * shares.max() else "white")
    fig.colorbar(image, ax=ax, label="share of routed tokens")
    ax.set_title(f"expert utilization (uniform = {1 / shares.shape[1]:.3f})")
    return _png(fig)


def checkpoint_figures(checkpoint: dict, records: list[dict]) -> dict[str, float]:
    """A checkpoint's numbers, for plots across checkpoints: its step's training loss, the
    validation loss and perplexity where measured, and the step's worst expert load (an
    expert's share of routed tokens x the number of experts: 1.0 is balanced)."""
    figures = {"loss": float(checkpoint["loss"])}
    if checkpoint.get("val_loss") is not None:
        figures["val_loss"] = float(checkpoint["val_loss"])
        figures["perplexity"] = math.exp(figures["val_loss"])
    experts = next((r.get("experts") for r in reversed(records) if r["step"] == checkpoint["step"]), None)
    if experts:
        figures["max_expert_load"] = float(max(layer["max_load"] for layer in experts))
    return figures


def png_markdown(png: bytes, alt: str) -> str:
    """Markdown that shows a PNG inline (Dagster has no image metadata type)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def evaluate_checkpoint(checkpoint, mixture_dir, *, seq_len: int, windows: int,
                        prompts: list[str], max_length: int, temperature: float, top_k: int,
                        seed: int = 0) -> dict:
    """Held-out loss and perplexity over `windows` validation windows of the mixture,
    expert utilization on them, and one sample per prompt."""
    import torch

    from blues_train.mixture.loader import PackedSequenceDataset
    from blues_train.serving.generate import load_model, sample_text

    model = load_model(checkpoint)
    val = PackedSequenceDataset(mixture_dir, seq_len, seed=seed, split="val")
    batch = torch.stack(list(itertools.islice(iter(val), windows)))
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(batch[:, :-1].to(device), labels=batch[:, 1:].to(device))
    layers = expert_utilization(out.tokens_per_expert.float().cpu().tolist(), model.config.moe_layers)
    samples = [
        {"prompt": prompt, "text": sample_text(model, prompt=prompt, max_length=max_length,
                                               temperature=temperature, top_k=top_k, seed=seed)}
        for prompt in prompts
    ]
    val_loss = float(out.loss)
    return {
        "val_loss": round(val_loss, 4),
        "perplexity": round(math.exp(val_loss), 2),
        "val_tokens": int(batch[:, 1:].numel()),
        "experts": layers,
        "max_expert_load": round(max(layer["max_load"] for layer in layers), 3),
        "min_expert_load": round(min(layer["min_load"] for layer in layers), 3),
        "expert_utilization_png": expert_utilization_png(layers),
        "samples": samples,
    }


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 3.5), dpi=100)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
