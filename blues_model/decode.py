"""Decoding at GPU speed: a static KV cache and the decode step captured in one CUDA graph.

Eager decoding launches about 60 kernels per layer and token, each a few microseconds of
work behind tens of microseconds of Python and launch overhead, so a 12-layer model waits
on the host (13 to 18 ms per token at batch 1 on an H200). Here the decode step is:

- static: every buffer it reads or writes (the KVCache, the input token of each row, the
  cache slot, the logits) is allocated once, and the slot is a [1] int64 tensor, so the
  step is the same sequence of kernels with the same addresses at every position;
- free of host syncs: no `.item()`, no boolean indexing, no shape that depends on data. The
  MoE layers use `MoE.decode`: "gather" (the chosen experts' weights read by index inside
  one fused reduction) for a few rows, "dense" (every expert, weighed by the routing
  weights) beyond, by measurement (`default_dispatch`; "grouped", forward's sorted
  `_grouped_mm`, lost at both batch 1 and 32);
- fused: each block's decode and the head go through `torch.compile` (norms, rotary,
  masking and SwiGLU elementwise work fused; one compiled graph per block kind);
- captured once in a `torch.cuda.CUDAGraph` and replayed per token; greedy decoding also
  takes the argmax, feeds it back and records it inside the graph, so the host only
  replays (and checks for end-of-text every EOS_CHECK_EVERY tokens).

The prompt (prefill) runs block by block into the same cache, compiled with a symbolic
prompt length (one graph per block kind for every prompt). Greedy output is the eager
loop's: exactly on the CPU (tests/test_decode.py, the step run eagerly) and in float32 on
CUDA (tests/test_gpu.py, compiled and captured); in bf16 the fused kernels round otherwise,
so a near-tie can pick the other token (docs/benchmarks.md, Decode).
`StaticDecoder(..., compile=False, graph=False)` runs the identical step eagerly, on any device.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
import torch.nn.functional as F

from .attention import KVCache, rope_cos_sin

EOS_CHECK_EVERY = 16  # decode steps between host reads of "has every row ended?"
RECOMPILE_LIMIT = 64


def step_inputs(valid_BS, slot_1, head_dim: int, rope_base: float):
    """Mark the slot valid; -> (cos, sin, mask [B, 1, 1, S]) for the token at `slot_1`.

    The same values as BluesLM.forward with a KVCache: the position counts the row's real
    tokens before it (left padding excluded), and the token attends to valid slots up to its own.
    """
    valid_BS.index_fill_(1, slot_1, True)
    positions_B1 = valid_BS.sum(-1, keepdim=True) - 1  # later slots are not valid yet
    key_S = torch.arange(valid_BS.shape[1], device=valid_BS.device)
    mask_B11S = (valid_BS & (key_S <= slot_1))[:, None, None, :]
    cos, sin = rope_cos_sin(positions_B1, head_dim, rope_base)
    return cos, sin, mask_B11S


def block_step(block, x, cos, sin, mask, k_cache, v_cache, slot_1, moe_dispatch: str, experts_t=None):
    return block.decode(x, cos, sin, mask, k_cache, v_cache, slot_1, moe_dispatch, experts_t)


def head_step(norm, embed_weight, x_B1D):
    """-> logits over every embedding row, padding included [B, padded_vocab]."""
    return F.linear(norm(x_B1D)[:, -1], embed_weight)


def whole_step(model, ids_B, valid_BS, slot_1, ks, vs, tokens_BS, moe_dispatch: str, greedy: bool, experts_t):
    """The whole decode step as one function (for one compiled graph of every layer)."""
    c = model.config
    cos, sin, mask = step_inputs(valid_BS, slot_1, c.head_dim, c.rope_base)
    x = model.embed(ids_B.unsqueeze(1))
    for i, block in enumerate(model.blocks):
        x = block.decode(x, cos, sin, mask, ks[i], vs[i], slot_1, moe_dispatch, experts_t[i])
    logits_BV = head_step(model.norm, model.embed.weight, x)
    if greedy:
        greedy_feedback(logits_BV, c.vocab_size, ids_B, tokens_BS, slot_1)
    return logits_BV


def argmax_over_vocab(logits_BV, vocab_size: int, chunk: int = 128):
    """logits[:, :vocab_size].argmax(-1) (first maximum) in two passes, so the first runs
    on many blocks: the maximum of each `chunk` columns, then the first chunk holding the largest."""
    B, V = logits_BV.shape
    col_V = torch.arange(V, device=logits_BV.device)
    masked_BV = torch.where(col_V < vocab_size, logits_BV, float("-inf"))
    if V % chunk:
        return masked_BV.argmax(-1)
    best_BC, at_BC = masked_BV.view(B, V // chunk, chunk).max(-1)
    chunk_B1 = best_BC.argmax(-1, keepdim=True)
    return (chunk_B1 * chunk + at_BC.gather(1, chunk_B1)).squeeze(1)


def greedy_feedback(logits_BV, vocab_size: int, ids_B, tokens_BS, slot_1):
    """Argmax -> the next step's input and the record at slot + 1; then advance the slot."""
    next_B = argmax_over_vocab(logits_BV, vocab_size)
    ids_B.copy_(next_B)
    tokens_BS.index_copy_(1, slot_1 + 1, next_B.unsqueeze(1))
    slot_1.add_(1)


@functools.cache
def compiled(fn):
    """fn through torch.compile (static shapes, the whole function one graph), built on first use.
    Precision casts are emulated so bf16 intermediates round where eager rounds them."""
    return torch.compile(fn, dynamic=False, fullgraph=True, options={"emulate_precision_casts": True})


def default_dispatch(config, dtype: torch.dtype, device: torch.device, batch_size: int) -> str:
    """The MoE dispatch for decoding `batch_size` rows, by measurement on an H200
    (docs/benchmarks.md, Decode): "gather" while the step's (token, expert) pairs are no
    more than the experts, "dense" beyond (at batch 32 it beat the sorted `_grouped_mm` by 20%)."""
    return "gather" if batch_size * config.top_k <= config.n_experts else "dense"


def prefill_dispatch(dtype: torch.dtype, device: torch.device) -> str:
    """Prompts hold many tokens: forward's grouped `_grouped_mm` where it runs natively (bf16
    on a Hopper-class GPU; elsewhere it falls back to a loop that syncs), else dense."""
    if device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9:
        return "grouped"
    return "dense"


def prefill_block(block, x, cos, sin, mask, k_cache, v_cache, moe_dispatch: str):
    """Block.forward with a KVCache for a prompt written from slot 0 (eval mode, no MoE stats)."""
    q, k, v = block.attn.project(block.attn_norm(x), cos, sin)
    k_cache[:, : x.shape[1]] = k
    v_cache[:, : x.shape[1]] = v
    x = x + block.attn.attend(q, k_cache, v_cache, mask)
    h = block.ffn_norm(x)
    if not block.is_moe:
        return x + block.ffn(h)
    return x + block.ffn.decode(h.flatten(0, 1), moe_dispatch).view_as(x)


@functools.cache
def compiled_dynamic(fn):
    """fn through torch.compile with symbolic shapes: one graph for every prompt length."""
    return torch.compile(fn, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True})


class StaticDecoder:
    """Decodes batches of `batch_size` rows of up to `max_len` tokens (prompt + new) with one
    static KV cache and, with `graph`, one captured CUDA graph per decode step.

    `greedy` bakes the argmax into the step; otherwise each step returns logits for the
    caller's sampler. `scope` "block" compiles each block (one graph per block kind, quick
    to compile), "step" the whole step (one graph of every layer, fused across blocks).
    `compile` and `graph` default to True on CUDA; off, the same step runs eagerly (any
    device), which is how the CPU tests check its logic against the eager path.
    """

    def __init__(self, model, batch_size: int, max_len: int, *, greedy: bool, moe_dispatch: str | None = None,
                 compile: bool | None = None, graph: bool | None = None, scope: str = "block"):
        param = next(model.parameters())
        on_cuda = param.device.type == "cuda"
        self._model = weakref.ref(model)  # decoder_for keeps decoders per model: no cycle through the key
        self.greedy, self.scope = greedy, scope
        self.moe_dispatch = moe_dispatch or default_dispatch(model.config, param.dtype, param.device, batch_size)
        self.compile = on_cuda if compile is None else compile
        self.graph = None
        self.cache = KVCache(model.config, batch_size, max_len, device=param.device, dtype=param.dtype)
        self.ids_B = torch.zeros(batch_size, dtype=torch.long, device=param.device)
        self.slot_1 = torch.zeros(1, dtype=torch.long, device=param.device)
        self.tokens_BS = torch.zeros(batch_size, max_len, dtype=torch.long, device=param.device)
        self.logits_BV = None
        # "gather" reads each chosen expert's weights transposed ([E, 2H, D] and [E, D, H]), so
        # that its products reduce over contiguous memory: static copies, refreshed per call.
        self.experts_t = [None] * len(model.blocks)
        if self.moe_dispatch == "gather":
            self.experts_t = [(b.ffn.w_gate_up.detach().transpose(1, 2).contiguous(),
                               b.ffn.w_down.detach().transpose(1, 2).contiguous()) if b.is_moe else None
                              for b in model.blocks]
        if on_cuda if graph is None else graph:
            self.capture()

    @property
    def model(self):
        return self._model()

    @torch.inference_mode()
    def refresh_weights(self) -> None:
        """Copy the model's current expert weights into the transposed buffers the step reads."""
        for block, held in zip(self.model.blocks, self.experts_t):
            if held is not None:
                held[0].copy_(block.ffn.w_gate_up.transpose(1, 2))
                held[1].copy_(block.ffn.w_down.transpose(1, 2))

    def fn(self, f):
        return compiled(f) if self.compile else f

    def step(self) -> torch.Tensor:
        """Feed ids_B at slot_1 through the model: -> logits [B, vocab] (greedy: also advance)."""
        # One compiled graph per block kind, batch size, cache length and dtype: more than
        # dynamo's default 8 recompiles in a process that decodes several shapes.
        with torch.inference_mode(), self.recompiles():
            return self._step()

    def recompiles(self):
        """Room for dynamo's recompiles while compiling (importing dynamo costs seconds: only then)."""
        return torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT) if self.compile else contextlib.nullcontext()

    def _step(self) -> torch.Tensor:
        m, cache, c = self.model, self.cache, self.model.config
        if self.scope == "step":
            logits_BV = self.fn(whole_step)(m, self.ids_B, cache.valid, self.slot_1, cache.k, cache.v,
                                            self.tokens_BS, self.moe_dispatch, self.greedy, self.experts_t)
            return logits_BV[:, : c.vocab_size]
        cos, sin, mask = self.fn(step_inputs)(cache.valid, self.slot_1, c.head_dim, c.rope_base)
        x = m.embed(self.ids_B.unsqueeze(1))
        block_fn = self.fn(block_step)
        for i, block in enumerate(m.blocks):
            x = block_fn(block, x, cos, sin, mask, cache.k[i], cache.v[i], self.slot_1, self.moe_dispatch,
                         self.experts_t[i])
        logits_BV = self.fn(head_step)(m.norm, m.embed.weight, x)
        if self.greedy:
            self.fn(greedy_feedback)(logits_BV, c.vocab_size, self.ids_B, self.tokens_BS, self.slot_1)
        return logits_BV[:, : c.vocab_size]

    def capture(self) -> None:
        """Warm up (compiles, plans cuBLAS) on a side stream, capture one step, then empty the cache."""
        with torch.cuda.device(self.cache.valid.device):  # the model's GPU, whichever is current
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.step()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits_BV = self.step()
        self.cache.reset()

    def advance(self) -> torch.Tensor:
        """One decode step from the current ids_B and slot_1: -> logits [B, vocab]."""
        if self.graph is None:
            logits_BV = self.step()
        else:
            self.graph.replay()
            logits_BV = self.logits_BV
        if not self.greedy:
            self.slot_1.add_(1)
        return logits_BV

    @torch.inference_mode()
    def prefill(self, ids_BP, valid_BP) -> torch.Tensor:
        """The prompts (left-padded) into the cache from slot 0: -> last logits [B, vocab]. The
        same computation as BluesLM.forward with a KVCache, block by block, compiled (symbolic
        prompt length) when the step is."""
        m, c, cache = self.model, self.model.config, self.cache
        cache.reset()
        P = ids_BP.shape[1]
        valid_BS = cache.extend(valid_BP)
        positions_BP = (valid_BS.cumsum(-1) - 1).clamp(min=0)[:, :P]
        key_S = torch.arange(valid_BS.shape[1], device=ids_BP.device)
        query_P1 = key_S[:P].unsqueeze(1)
        mask = (((key_S <= query_P1) & valid_BS.unsqueeze(1)) | (key_S == query_P1)).unsqueeze(1)
        cos, sin = rope_cos_sin(positions_BP, c.head_dim, c.rope_base)
        param = m.embed.weight
        dispatch = prefill_dispatch(param.dtype, param.device)
        block_fn = compiled_dynamic(prefill_block) if self.compile else prefill_block
        x = m.embed(ids_BP)
        with self.recompiles():
            for i, block in enumerate(m.blocks):
                x = block_fn(block, x, cos, sin, mask, cache.k[i], cache.v[i], dispatch)
        self.slot_1.fill_(P)
        return F.linear(m.norm(x[:, -1]), m.embed.weight)[:, : c.vocab_size]

    @torch.inference_mode()
    def generate(self, ids_BP, valid_BP, n_new: int, sample, eos_id: int | None) -> torch.Tensor:
        """-> new tokens [B, n <= n_new]; stops once every row has produced eos_id (checked
        every EOS_CHECK_EVERY steps: rows are cut at their first eos_id by the caller).
        `sample(logits_BV) -> ids_B` picks each token when not greedy."""
        P = ids_BP.shape[1]
        self.refresh_weights()
        first_B = sample(self.prefill(ids_BP, valid_BP))
        self.ids_B.copy_(first_B)
        self.tokens_BS[:, P] = first_B
        done = 1
        while done < n_new:
            if eos_id is not None and done % EOS_CHECK_EVERY == 0:
                if bool((self.tokens_BS[:, P : P + done] == eos_id).any(1).all()):
                    break
            logits_BV = self.advance()
            if not self.greedy:
                next_B = sample(logits_BV)
                self.ids_B.copy_(next_B)
                self.tokens_BS[:, P + done] = next_B
            done += 1
        return self.tokens_BS[:, P : P + done]


_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its last StaticDecoder


def decoder_for(model, batch_size: int, max_len: int, greedy: bool) -> StaticDecoder:
    """The model's StaticDecoder for this shape, reused from the last call when it fits (capturing
    costs a few steps; compiling, once per process, more). Its graph holds the parameters'
    addresses, so a model whose tensors moved gets a new one."""
    param = next(model.parameters())
    key = ((batch_size, max_len), greedy, param.dtype,
           tuple(p.data_ptr() for p in model.parameters()), torch.is_autocast_enabled("cuda"))
    held = _decoders.get(model)
    if held is not None and held[0] == key:
        return held[1]
    _decoders.pop(model, None)  # free the old graph and cache before allocating the new ones
    decoder = StaticDecoder(model, batch_size, max_len, greedy=greedy)
    _decoders[model] = (key, decoder)
    return decoder
