"""A Blues checkpoint as an lm-evaluation-harness model (lm_eval's TemplateLM).

The harness encodes each (context, continuation) pair with our tokenizer (TemplateLM moves
a context's trailing spaces into the continuation, as for every causal model), and this
adapter scores the continuation tokens: their summed log-probability and whether each is
the model's greedy choice, from `BluesLM` in eval mode (no router noise). A row longer than
the model's max_seq_len keeps its last max_seq_len + 1 tokens, as the harness's HF model does.

Rows of a batch are right-padded: attention is causal and the router is per token, so the
padding after a row's tokens changes nothing before it, and batch size 1 and 8 score alike.
Only the continuation positions go through the head, so no [B, T, vocab] logits are held.

Imported only once lm_eval is known to be installed (`blues_train.serving.evaluation`).
"""

from __future__ import annotations

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from blues_model import BluesLM
from blues_model.generation import generate
from blues_train.data import tokenizer
from blues_train.training import metrics

DEFAULT_GEN_TOKENS = 256


def score_continuations(model: BluesLM, pairs: list[tuple[list[int], list[int]]],
                        batch_size: int) -> list[tuple[float, bool]]:
    """(log-probability of `continuation` after `context`, is it the greedy continuation)
    for each (context ids, continuation ids), longest rows first in batches of `batch_size`."""
    limit = model.config.max_seq_len
    rows = [((context + continuation)[-(limit + 1):], len(continuation)) for context, continuation in pairs]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        for i, result in zip(batch, score_batch(model, [rows[i] for i in batch])):
            results[i] = result
    return results


def score_batch(model: BluesLM, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
    """`score_continuations` of one batch of (tokens, continuation length) rows."""
    device = next(model.parameters()).device
    width = max(len(tokens) for tokens, _ in rows) - 1
    input_ids = torch.full((len(rows), width), tokenizer.EOT_ID, dtype=torch.long)
    for r, (tokens, _) in enumerate(rows):
        input_ids[r, :len(tokens) - 1] = torch.as_tensor(tokens[:-1])
    hidden = metrics.final_hidden(model, input_ids.to(device))
    weight, vocab = model.embed.weight, model.config.vocab_size
    results = []
    with torch.no_grad():
        for r, (tokens, n) in enumerate(rows):
            positions = slice(len(tokens) - 1 - n, len(tokens) - 1)
            logits = (hidden[r, positions] @ weight.T)[:, :vocab].float()
            target = torch.as_tensor(tokens[-n:], device=device)
            logprobs = logits.log_softmax(-1).gather(1, target[:, None]).squeeze(1)
            results.append((logprobs.sum().item(), bool((logits.argmax(-1) == target).all())))
    return results


class BluesHarnessLM(TemplateLM):
    """`model` for `lm_eval.simple_evaluate`."""

    def __init__(self, model: BluesLM, batch_size: int = 1):
        super().__init__()
        self.model, self.batch_size = model, batch_size

    @property
    def eot_token_id(self) -> int:
        return tokenizer.EOT_ID

    @property
    def tokenizer_name(self) -> str:
        return tokenizer.NAME

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return tokenizer.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        return score_continuations(self.model, [(context, continuation) for _, context, continuation in requests],
                                   self.batch_size)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-probability, in disjoint windows of max_seq_len tokens."""
        totals = []
        for (text,) in (request.args for request in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=tokenizer.encode(text), prefix_token=tokenizer.EOT_ID,
                max_seq_len=self.model.config.max_seq_len, context_len=1)]
            totals.append(sum(ll for ll, _ in score_continuations(self.model, windows, self.batch_size)))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) text after each context, cut at the first stop string."""
        outputs = []
        for context, kwargs in (request.args for request in requests):
            kwargs = dict(kwargs)
            until = kwargs.get("until") or [tokenizer.decode([tokenizer.EOT_ID])]
            until = [until] if isinstance(until, str) else until
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            ids = tokenizer.encode(context)[-(self.model.config.max_seq_len - 1):] or [tokenizer.EOT_ID]
            new = generate(self.model, [ids], int(kwargs.get("max_gen_toks", DEFAULT_GEN_TOKENS)),
                           temperature=temperature, eos_id=tokenizer.EOT_ID)[0]
            text = tokenizer.decode(new)
            outputs.append(min((text.split(stop)[0] for stop in until), key=len))
        return outputs
