"""Blues decoder language model.

Architectural choices of Blues-01 (`BluesConfig()`):
- Pre-norm decoder, 12 layers, d_model 768, RMSNorm (eps 1e-5, computed in fp32), no biases.
- Multi-query attention: 12 query heads of width 64, one shared key/value head
  (attention.py), rotary position embeddings (base 10000) on queries and keys.
- Feed-forward: SwiGLU with hidden width 2048 (about 8/3 · d_model). Odd layers (1, 3,
  ..., 11; `moe_every` 2) replace it with a mixture of 8 such experts, top-2, noisy
  router (moe.py); `moe_every=1` makes every layer MoE.
- Vocabulary: o200k_base (200019 ids) padded to 200064 rows, a multiple of 128, so the
  head matmul stays aligned; the padded rows never receive probability mass.
- Tied embeddings: the LM head is the token embedding (153.6M of the 423.9M parameters;
  untying would add as much again to a model whose experts are the point).
- Init: normal(0, 0.02); residual output projections normal(0, 0.02 / sqrt(2 · n_layers));
  router W_noise zero (Shazeer); RMSNorm weights one.
- Loss: with `labels`, the head and cross-entropy run in token chunks (ChunkedCrossEntropy)
  so fp32 logits of the whole batch never exist; the gradients are computed in the same
  pass, so no logits are recomputed in backward. On CUDA the per-chunk softmax arithmetic
  is the same function through torch.compile (fused passes over the logits).
- Gradient checkpointing per block (`RunOptions.gradient_checkpointing`), RNG-preserving,
  so the router noise is the same in the recomputation.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, KVCache, document_mask, documents, resolve_backend, rope_cos_sin
from .config import BluesConfig, RunOptions
from .moe import MoE

IGNORE_INDEX = -100


@dataclass
class BluesOutput:
    logits: torch.Tensor | None  # [B, T, vocab_size]; None when labels were given
    loss: torch.Tensor | None  # mean cross-entropy over labels != -100, fp32
    aux_loss: torch.Tensor  # load balancing, mean over MoE layers, 1.0 when uniform
    z_loss: torch.Tensor  # router z-loss, mean over MoE layers
    tokens_per_expert: torch.Tensor  # [n_moe_layers, n_experts] int64, detached


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """Dense FFN: down(silu(gate) * up), gate and up fused in one matmul (gate block first)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: BluesConfig, layer: int, attn_backend: str):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config, layer, attn_backend)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.is_moe = layer in config.moe_layers
        self.ffn = MoE(config) if self.is_moe else SwiGLU(config.d_model, config.ffn_hidden)

    def forward(self, x, cos, sin, mask=None, kv_cache=None):
        """-> (x, None) for a dense block; (x, (aux_loss, z_loss, tokens_per_expert)) for MoE."""
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, kv_cache)
        h = self.ffn_norm(x)
        if not self.is_moe:
            return x + self.ffn(h), None
        y, aux_loss, z_loss, tokens_per_expert = self.ffn(h.flatten(0, 1))
        return x + y.view_as(x), (aux_loss, z_loss, tokens_per_expert)

    def decode(self, x, cos, sin, mask, k_cache, v_cache, slot, moe_dispatch: str = "dense", experts_t=None):
        """forward for one new token per row with a static cache (decode.py), eval mode, no MoE stats."""
        x = x + self.attn.decode(self.attn_norm(x), cos, sin, mask, k_cache, v_cache, slot)
        h = self.ffn_norm(x)
        if not self.is_moe:
            return x + self.ffn(h)
        return x + self.ffn.decode(h.flatten(0, 1), moe_dispatch, experts_t).view_as(x)


def cross_entropy_chunk(logits_NV, target_N, valid_N, vocab_size: int, need_grad: bool):
    """(sum of CE over valid rows, its gradient w.r.t. the logits in logits' dtype or None).

    Columns from vocab_size on are padding and get no probability. Written without in-place
    ops so that torch.compile fuses it into one reduction and one pointwise pass on CUDA.
    """
    logits = logits_NV.float()
    col_V = torch.arange(logits.shape[1], device=logits.device)
    logits = torch.where(col_V < vocab_size, logits, float("-inf"))
    lse_N = logits.logsumexp(-1)
    target_logit_N = logits.gather(1, target_N.unsqueeze(1)).squeeze(1)
    loss_sum = torch.where(valid_N, lse_N - target_logit_N, 0.0).sum()
    if not need_grad:
        return loss_sum, None
    dlogits = (logits - lse_N.unsqueeze(1)).exp() - (col_V == target_N.unsqueeze(1)).float()
    return loss_sum, torch.where(valid_N.unsqueeze(1), dlogits, 0.0).to(logits_NV.dtype)


def cross_entropy_chunk_eager(logits_NV, target_N, valid_N, vocab_size: int, need_grad: bool):
    """cross_entropy_chunk without torch.compile (CPU): the same sums, computed in place in
    `logits_NV` (a temporary of the caller's), which takes a third of the time of
    cross_entropy_chunk's out-of-place passes on a CPU (measured)."""
    logits = logits_NV.float()
    logits[:, vocab_size:] = float("-inf")
    max_N1 = logits.amax(-1, keepdim=True)
    target_logit_N = logits.gather(1, target_N.unsqueeze(1)).squeeze(1)
    probs = logits.sub_(max_N1).exp_()
    total_N1 = probs.sum(-1, keepdim=True)
    lse_N = (total_N1.log() + max_N1).squeeze(1)
    loss_sum = torch.where(valid_N, lse_N - target_logit_N, 0.0).sum()
    if not need_grad:
        return loss_sum, None
    dlogits = probs.div_(total_N1)
    dlogits[torch.arange(dlogits.shape[0], device=dlogits.device), target_N] -= 1.0
    dlogits[~valid_N] = 0.0
    return loss_sum, dlogits.to(logits_NV.dtype)


@functools.cache
def compiled_cross_entropy_chunk():
    """cross_entropy_chunk through torch.compile, built on first use (importing dynamo is slow)."""
    return torch.compile(cross_entropy_chunk, dynamic=False)


class ChunkedCrossEntropy(torch.autograd.Function):
    """mean CE of (h @ weight.T)[:, :vocab_size] against labels, `chunk` rows at a time.

    Forward also computes d(sum CE)/dh and d(sum CE)/dweight chunk by chunk (softmax minus
    one-hot, times weight or h), so peak memory holds one chunk's logits, and backward
    only scales the stored gradients by grad_output / n_valid.
    """

    @staticmethod
    def forward(ctx, h_ND, weight_VD, labels_N, vocab_size: int, chunk: int, need_grad: bool):
        valid_N = labels_N != IGNORE_INDEX
        n_valid = valid_N.sum().clamp(min=1)
        target_N = labels_N.clamp(min=0)
        ce_chunk = compiled_cross_entropy_chunk() if h_ND.is_cuda else cross_entropy_chunk_eager
        loss_sum = torch.zeros((), device=h_ND.device, dtype=torch.float32)
        grad_h = torch.empty_like(h_ND) if need_grad else None
        grad_w = torch.zeros_like(weight_VD, dtype=torch.float32) if need_grad else None
        for s in range(0, h_ND.shape[0], chunk):
            h_c = h_ND[s : s + chunk]
            loss_c, dlogits_c = ce_chunk(h_c @ weight_VD.T, target_N[s : s + chunk], valid_N[s : s + chunk],
                                         vocab_size, need_grad)
            loss_sum += loss_c
            if need_grad:
                grad_h[s : s + chunk] = dlogits_c @ weight_VD
                if grad_w.dtype == dlogits_c.dtype:
                    grad_w.addmm_(dlogits_c.T, h_c)
                else:
                    grad_w += dlogits_c.T @ h_c
        ctx.save_for_backward(grad_h, grad_w, n_valid)
        ctx.weight_dtype = weight_VD.dtype
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = grad_out / n_valid
        return grad_h * scale.to(grad_h.dtype), (grad_w * scale).to(ctx.weight_dtype), None, None, None, None


def chunked_cross_entropy(h_ND, weight_VD, labels_N, vocab_size: int, chunk: int) -> torch.Tensor:
    """Equals F.cross_entropy((h @ weight.T)[:, :vocab_size].float(), labels, ignore_index=-100),
    except that it is 0 (not NaN) when every label is ignored."""
    need_grad = torch.is_grad_enabled() and (h_ND.requires_grad or weight_VD.requires_grad)
    return ChunkedCrossEntropy.apply(h_ND, weight_VD, labels_N, vocab_size, chunk, need_grad)


class BluesLM(nn.Module):
    def __init__(self, config: BluesConfig, options: RunOptions = RunOptions()):
        super().__init__()
        self.config, self.options = config, options
        backend = resolve_backend(options.attn_backend)
        # Built on the meta device (to load weights into) it draws nothing: drawing on meta
        # tensors imports torch._dynamo, seconds of every `blues generate`.
        meta = torch.empty(0).is_meta
        shape = (config.padded_vocab_size, config.d_model)
        self.embed = nn.Embedding(*shape, _weight=torch.empty(shape) if meta else None)
        self.blocks = nn.ModuleList(Block(config, i, backend) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        if not meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        std = self.config.init_std
        for name, p in self.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("w_noise"):
                p.zero_()
            elif name.endswith(("attn.out.weight", "down.weight", "w_down")):
                p.normal_(0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                p.normal_(0.0, std)

    def nudge_expert_bias(self, shares: list[list[float]], rate: float) -> None:
        """Router.nudge_bias of every MoE layer, from its experts' shares of the routed tokens
        (one list per MoE layer, in block order)."""
        routers = [block.ffn.router for block in self.blocks if block.is_moe]
        for router, share in zip(routers, shares, strict=True):
            router.nudge_bias(torch.tensor(share), rate)

    def compile_blocks(self) -> None:
        """torch.compile each decoder block in place (fuses norms, rotary and SwiGLU
        elementwise work); the blocks share one compiled graph per kind, dense or MoE."""
        for block in self.blocks:
            block.compile()

    def forward(self, input_ids, labels=None, *, attention_mask=None, kv_cache: KVCache | None = None,
                last_only: bool = False) -> BluesOutput:
        """input_ids [B, T]; labels [B, T] already shifted (labels[:, t] is the token after
        input_ids[:, t]), -100 ignored. attention_mask [B, T] (True = real token, False =
        left padding) and kv_cache are for batched decoding, which attends causally over the
        whole sequence; otherwise RunOptions.attention_mask "document" keeps each document of a
        packed window to itself. last_only keeps only the last position's logits."""
        c = self.config
        B, T = input_ids.shape
        mask = None
        if attention_mask is None and kv_cache is None and self.options.attention_mask == "document":
            doc_BT, positions = documents(input_ids)
            mask = document_mask(doc_BT)
        elif attention_mask is None and kv_cache is None:
            positions = torch.arange(T, device=input_ids.device).unsqueeze(0)
        else:
            valid_BT = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            valid_BS = kv_cache.extend(valid_BT) if kv_cache is not None else valid_BT
            start = kv_cache.start if kv_cache is not None else 0
            positions = (valid_BS.cumsum(-1) - 1).clamp(min=0)[:, start : start + T]
            key_S = torch.arange(valid_BS.shape[1], device=input_ids.device)
            query_T = key_S[start : start + T].unsqueeze(1)
            mask = (((key_S <= query_T) & valid_BS.unsqueeze(1)) | (key_S == query_T)).unsqueeze(1)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_base)

        x = self.embed(input_ids)
        moe_stats = []
        for block in self.blocks:
            if self.options.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, stats = checkpoint(block, x, cos, sin, mask, kv_cache, use_reentrant=False)
            else:
                x, stats = block(x, cos, sin, mask, kv_cache)
            if stats is not None:
                moe_stats.append(stats)
        x = self.norm(x)
        aux_loss, z_loss, tokens_per_expert = (torch.stack(s) for s in zip(*moe_stats))

        logits = loss = None
        if labels is None:
            logits = F.linear(x[:, -1:] if last_only else x, self.embed.weight)[..., : c.vocab_size]
        else:
            loss = chunked_cross_entropy(
                x.flatten(0, 1), self.embed.weight, labels.flatten(), c.vocab_size,
                self.options.loss_chunk_tokens,
            )
        return BluesOutput(logits, loss, aux_loss.mean(), z_loss.mean(), tokens_per_expert.detach())
