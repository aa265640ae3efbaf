"""Multi-query causal self-attention with rotary position embeddings, and its KV cache.

Kernels: `flash_attn.flash_attn_func` when the flash-attn package is importable and the
call is a plain causal pass on CUDA in half precision; otherwise
`F.scaled_dot_product_attention`, which itself picks its flash or memory-efficient kernel
where the device has one. `enable_gqa` lets the single KV head serve all query heads
without copying it.

Document masking (`RunOptions.attention_mask="document"`): a packed window holds documents
each ended by EOT_ID, so position i starts a document iff i == 0 or token i - 1 is EOT_ID;
a query attends only to earlier keys of its own document (block-causal), and rotary
positions count from each document's start. On CUDA through FlexAttention (a compiled
kernel that skips the fully masked tiles, `document_block_mask`); elsewhere through SDPA
with the explicit boolean mask (`document_dense_mask`), the reference.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .config import EOT_ID, BluesConfig

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

logger = logging.getLogger(__name__)


def resolve_backend(requested: str) -> str:
    """The attention backend a model will use for `RunOptions.attn_backend`, logged once per model."""
    backend = requested
    if requested == "auto":
        backend = "flash_attn" if flash_attn_func is not None else "sdpa"
    if backend == "flash_attn" and flash_attn_func is None:
        raise ImportError("attn_backend='flash_attn' needs the flash-attn package: pip install 'blues[flash]'")
    logger.info("attention backend: %s (requested %r)", backend, requested)
    return backend


def documents(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(document index, position inside that document), both [B, T] int64, of each token of
    packed windows input_ids [B, T]: a document starts at 0 and after every EOT_ID."""
    B, T = input_ids.shape
    index_T = torch.arange(T, device=input_ids.device)
    starts_BT = torch.ones_like(input_ids, dtype=torch.bool)
    starts_BT[:, 1:] = input_ids[:, :-1] == EOT_ID
    start_of_doc_BT = torch.where(starts_BT, index_T, 0).cummax(dim=-1).values
    return starts_BT.cumsum(-1) - 1, index_T - start_of_doc_BT


def document_dense_mask(doc_BT: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool, True where query t may attend to key s: s <= t in the same document."""
    T = doc_BT.shape[1]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=doc_BT.device).tril()
    return ((doc_BT.unsqueeze(2) == doc_BT.unsqueeze(1)) & causal_TT).unsqueeze(1)


@functools.cache
def compiled_flex():
    """(flex_attention, create_block_mask) through torch.compile, built on first use: uncompiled
    FlexAttention materializes the scores."""
    return torch.compile(flex_attention, dynamic=False), torch.compile(create_block_mask, dynamic=False)


def document_block_mask(doc_BT: torch.Tensor) -> BlockMask:
    """The FlexAttention block mask of document_dense_mask (CUDA)."""
    B, T = doc_BT.shape

    def same_document_causal(b, h, q, kv):
        return (doc_BT[b, q] == doc_BT[b, kv]) & (kv <= q)

    return compiled_flex()[1](same_document_causal, B, None, T, T, device=doc_BT.device)


def document_mask(doc_BT: torch.Tensor) -> torch.Tensor | BlockMask:
    """The block-causal mask of packed windows, in the form Attention.attend computes fastest on their device."""
    return document_block_mask(doc_BT) if doc_BT.is_cuda else document_dense_mask(doc_BT)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles for integer `positions` [B, T] -> [B, T, 1, head_dim / 2], fp32."""
    inv_freq = base ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + head_dim / 2) of x [B, T, heads, head_dim] (GPT-NeoX / Llama layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class KVCache:
    """Keys and values of every layer for up to `max_len` positions, and which slots hold real tokens.

    `extend` reserves the slots of the next forward call; each layer's `update` then writes
    its keys and values there. Attention always reads all max_len slots (unfilled ones are
    invalid, so masked): shapes stay fixed from step to step, and kernels that plan per
    shape (cuDNN attention) plan once. The buffers are allocated once (a static cache):
    `k[layer]` and `v[layer]` are [B, max_len, n_kv_heads, head_dim], one tensor per layer,
    so a CUDA graph captured over them (decode.py) stays valid while the cache is reused.
    """

    def __init__(self, config: BluesConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, max_len, config.n_kv_heads, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.valid = torch.zeros(batch_size, max_len, device=device, dtype=torch.bool)
        self.start = self.length = 0

    def reset(self) -> None:
        """Empty the cache for a new batch of prompts; the buffers stay where they are."""
        self.valid.zero_()
        self.start = self.length = 0

    def extend(self, valid_BT: torch.Tensor) -> torch.Tensor:
        """Reserve the next len(valid_BT[0]) slots (from `start`); return every slot's validity, [B, max_len]."""
        if self.length + valid_BT.shape[1] > self.valid.shape[1]:
            raise ValueError(f"KV cache holds {self.valid.shape[1]} positions; {self.length + valid_BT.shape[1]} needed")
        self.start, self.length = self.length, self.length + valid_BT.shape[1]
        self.valid[:, self.start : self.length] = valid_BT
        return self.valid

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer][:, self.start : self.length] = k
        self.v[layer][:, self.start : self.length] = v
        return self.k[layer], self.v[layer]


class Attention(nn.Module):
    def __init__(self, config: BluesConfig, layer: int, backend: str):
        super().__init__()
        self.layer, self.backend = layer, backend
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.qkv = nn.Linear(config.d_model, (config.n_heads + 2 * config.n_kv_heads) * config.head_dim, bias=False)
        self.out = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=False)

    def project(self, x, cos, sin):
        """x [B, T, d] -> q [B, T, n_heads, hd], k and v [B, T, n_kv_heads, hd], rotary applied."""
        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1)
        q = apply_rope(q.view(B, T, self.n_heads, hd), cos, sin)
        k = apply_rope(k.view(B, T, self.n_kv_heads, hd), cos, sin)
        return q, k, v.view(B, T, self.n_kv_heads, hd)

    def attend(self, q, k, v, mask):
        """Attention of q over k and v (all [B, T or S, heads, hd]), then the output projection.
        mask: None (causal), a bool tensor [B, 1, T, S] (True = may attend) or a BlockMask."""
        B, T = q.shape[:2]
        if isinstance(mask, BlockMask):
            flex = compiled_flex()[0] if q.is_cuda else flex_attention
            y = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                     enable_gqa=True).transpose(1, 2)
        elif self.backend == "flash_attn" and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            y = flash_attn_func(q, k, v, causal=True)
        else:
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=mask, is_causal=mask is None, enable_gqa=True,
            ).transpose(1, 2)
        return self.out(y.reshape(B, T, self.n_heads * self.head_dim))

    def forward(self, x, cos, sin, mask=None, kv_cache: KVCache | None = None):
        """x [B, T, d]; mask as for attend."""
        q, k, v = self.project(x, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)
        return self.attend(q, k, v, mask)

    def decode(self, x_B1D, cos, sin, mask_B11S, k_cache_BSGd, v_cache_BSGd, slot_1):
        """One new token per row, written into this layer's cache at slot `slot_1` (a [1] int64
        tensor, so a captured graph serves every step): the same computation as forward with
        a KVCache, with no Python number that changes from step to step."""
        q, k, v = self.project(x_B1D, cos, sin)
        k_cache_BSGd.index_copy_(1, slot_1, k)
        v_cache_BSGd.index_copy_(1, slot_1, v)
        return self.attend(q, k_cache_BSGd, v_cache_BSGd, mask_B11S)
