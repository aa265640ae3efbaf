"""Plain reference implementations that more than one test module checks the fast code
against: the MoE layer token by token, a token store read row by row with the validation
rule written out, and which source each piece of a packed stream came from; and the
network switched off for a fresh interpreter."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from blues_model.moe import MoE
from blues_train.data.tokenizer import EOT_ID

# The first lines of a script run in a fresh interpreter that must work with no network.
NETWORK_OFF = """
import socket
def refuse(*a, **k):
    raise OSError("network disabled by test")
socket.socket.connect = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
"""


def naive_moe(moe: MoE, x_TD):
    """The oracle: route each token in plain fp32 arithmetic and run its experts one by one."""
    logits_TE = x_TD @ moe.router.w_gate
    top_TK, ids_TK = logits_TE.topk(moe.top_k, dim=-1)
    weights_TK = top_TK.softmax(-1)
    H = moe.w_down.shape[1]
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros_like(x_TD[t])
        for k in range(moe.top_k):
            e = ids_TK[t, k]
            h = x_TD[t] @ moe.w_gate_up[e]
            y = y + weights_TK[t, k] * ((F.silu(h[:H]) * h[H:]) @ moe.w_down[e])
        rows.append(y)
    z_loss = torch.logsumexp(logits_TE, -1).square().mean()
    return torch.stack(rows), z_loss, torch.bincount(ids_TK.flatten(), minlength=moe.w_down.shape[0])


MASK = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def store_docs(store_dir, fraction: float) -> dict[str, list[tuple]]:
    """{"train": [...], "val": [...]}: every document's tokens, split by the documented rule."""
    manifest = json.loads((store_dir / "manifest.json").read_text())
    sha = {s["path"]: s["sha256"] for s in manifest["sources"]}
    docs = {"train": [], "val": []}
    for chunk in manifest["chunks"]:
        with pa.memory_map(str(store_dir / chunk["file"])) as f:
            rows = pa.ipc.open_file(f).read_all().to_pylist()
        for row in rows:
            key = splitmix64((int(sha[row["source"]][:16], 16) + row["index"]) & MASK)
            split = "val" if key < fraction * 2.0**64 else "train"
            if row["tokens"]:
                docs[split].append(tuple(row["tokens"]))
    return docs


def blob(docs) -> bytes:
    """Documents as uint32 bytes, each between EOTs, for substring search."""
    ids = [EOT_ID]
    for doc in docs:
        ids += [*doc, EOT_ID]
    return np.array(ids, dtype=np.uint32).tobytes()


def stream(windows) -> list[int]:
    """Windows overlap by one token: the packed stream they were cut from."""
    ids = list(windows[0].tolist())
    for window in windows[1:]:
        assert window[0].item() == ids[-1]
        ids += window[1:].tolist()
    return ids


def pieces(ids: list[int]) -> list[bytes]:
    """Complete EOT-delimited pieces of a stream (the cut ends are dropped)."""
    cuts = [i for i, t in enumerate(ids) if t == EOT_ID]
    return [np.array(ids[a + 1:b], dtype=np.uint32).tobytes() for a, b in zip(cuts, cuts[1:])]


def tokens_by_source(ids: list[int], blobs: list[bytes]) -> np.ndarray:
    """Tokens of each source in a stream; every piece must be (part of) one source's document."""
    counts = np.zeros(len(blobs))
    eot = np.array([EOT_ID], dtype=np.uint32).tobytes()
    for piece in pieces(ids):
        owners = [i for i, b in enumerate(blobs)
                  if eot + piece + eot in b or eot + piece in b or piece + eot in b]
        assert owners, "a piece of the stream is in no source's documents of this split"
        counts[owners[0]] += len(piece) // 4
    return counts


def take(dataset, n: int) -> list[torch.Tensor]:
    iterator = iter(dataset)
    return [next(iterator) for _ in range(n)]
