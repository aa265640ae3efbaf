"""Decoding with the KV cache, and sliding-window perplexity.

A batch of prompts of different lengths is left-padded; the attention mask hides the
padding and positions count real tokens only, so each row decodes exactly as it would
alone (the router is per token and dropless, so padding cannot change routing).

On CUDA `generate` decodes through decode.py (static cache, compiled step replayed as a
CUDA graph); elsewhere, or with `fast=False`, through the eager loop below, the reference
that the fast path is tested against.
"""

from __future__ import annotations

import math

import torch

from .attention import KVCache
from .config import EOT_ID
from .decode import decoder_for
from .model import IGNORE_INDEX, BluesLM


def sample_next(logits_BV, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, generator=None):
    """Next token per row: argmax when temperature == 0, else a draw after the top-k and top-p cuts."""
    if temperature == 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / temperature
    if top_k > 0:
        kth_B1 = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(-1)
        mass_before_BV = probs_BV.cumsum(-1) - probs_BV
        beyond_BV = mass_before_BV >= top_p
        beyond_BV[:, 0] = False  # the most likely token always stays, so top_p <= 0 is greedy
        sorted_BV = sorted_BV.masked_fill(beyond_BV, float("-inf"))
        logits_BV = torch.empty_like(logits_BV).scatter_(-1, order_BV, sorted_BV)
    return torch.multinomial(logits_BV.softmax(-1), 1, generator=generator).squeeze(1)


@torch.inference_mode()
def generate(model: BluesLM, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, eos_id: int | None = EOT_ID, generator=None,
             fast: bool | None = None) -> list[list[int]]:
    """New tokens for each prompt, without the prompt and without the final eos_id.

    Stops a row at eos_id (None: never), after max_new_tokens, or when prompt + output
    reaches config.max_seq_len. temperature 0 is greedy. `generator` is a torch.Generator
    on the model's device, for repeatable sampling. `fast` (default: on CUDA) decodes with
    decode.py's captured step; False takes the eager loop.
    """
    if not (temperature >= 0 and top_p >= 0) or top_k < 0:  # `not >=`: nan is refused too
        raise ValueError(f"need temperature >= 0, top_k >= 0 and top_p >= 0, got {temperature}, {top_k}, {top_p}")
    cfg = model.config
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0 or longest >= cfg.max_seq_len:
        raise ValueError(f"every prompt needs 1 to {cfg.max_seq_len - 1} tokens (max_seq_len {cfg.max_seq_len})")
    n_new = min(max_new_tokens, cfg.max_seq_len - longest)
    if n_new < 1:
        return [[] for _ in prompts]
    param = next(model.parameters())
    ids_BP = torch.zeros(len(prompts), longest, dtype=torch.long)
    valid_BP = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids_BP[row, longest - len(prompt) :] = torch.as_tensor(prompt)
        valid_BP[row, longest - len(prompt) :] = True
    ids_BP, valid_BP = ids_BP.to(param.device), valid_BP.to(param.device)

    def sample(logits_BV):
        return sample_next(logits_BV, temperature, top_p, top_k, generator)

    was_training = model.training
    model.eval()
    try:
        if param.is_cuda if fast is None else fast:
            decoder = decoder_for(model, len(prompts), longest + n_new, greedy=temperature == 0)
            rows = decoder.generate(ids_BP, valid_BP, n_new, sample, eos_id).tolist()
        else:
            rows = eager_decode(model, ids_BP, valid_BP, n_new, sample, eos_id)
    finally:
        model.train(was_training)
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


def eager_decode(model: BluesLM, ids_BP, valid_BP, n_new: int, sample, eos_id: int | None) -> list[list[int]]:
    """The plain loop: a KVCache, one eager forward per new token, a host check per token."""
    B, P = ids_BP.shape
    cache = KVCache(model.config, B, P + n_new, device=ids_BP.device, dtype=next(model.parameters()).dtype)
    logits_BV = model(ids_BP, attention_mask=valid_BP, kv_cache=cache, last_only=True).logits[:, -1]
    new_tokens = []
    done_B = torch.zeros(B, dtype=torch.bool, device=ids_BP.device)
    for step in range(n_new):
        next_B = sample(logits_BV)
        new_tokens.append(next_B)
        if eos_id is not None:
            done_B |= next_B == eos_id
            if bool(done_B.all()):
                break
        if step + 1 < n_new:
            logits_BV = model(next_B.unsqueeze(1), kv_cache=cache).logits[:, -1]
    return torch.stack(new_tokens, dim=1).tolist()


@torch.inference_mode()
def perplexity(model: BluesLM, ids, stride: int | None = None) -> float:
    """exp(mean next-token NLL) of a token sequence, each token scored once.

    Windows of max_seq_len inputs start every `stride` tokens (default max_seq_len // 2);
    each window scores only the targets no earlier window scored, so every target but
    those of the first window sees at least max_seq_len - stride tokens of context.
    """
    window = model.config.max_seq_len
    stride = stride or window // 2
    if not 0 < stride <= window:
        raise ValueError(f"stride {stride} must be between 1 and max_seq_len {window}")
    ids = torch.as_tensor(ids, dtype=torch.long, device=next(model.parameters()).device)
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    was_training = model.training
    model.eval()
    try:
        nll, scored, start = 0.0, 0, 0
        while scored < ids.numel() - 1:
            end = min(start + window, ids.numel() - 1)
            labels = ids[start + 1 : end + 1].clone()
            labels[: scored - start] = IGNORE_INDEX
            loss = model(ids[None, start:end], labels=labels[None]).loss
            nll += loss.item() * (end - scored)
            scored, start = end, start + stride
    finally:
        model.train(was_training)
    return math.exp(nll / (ids.numel() - 1))
