"""Blues model configuration, named presets, parameter count and FLOP estimate.

`BluesConfig` is the architecture: what the weights mean. How a model executes (attention
kernel, gradient checkpointing, loss chunking) is a `RunOptions`, chosen per run: it never
changes what a checkpoint holds, so a resumed run may change it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

ATTN_BACKENDS = ("auto", "sdpa", "flash_attn")
ATTENTION_MASKS = ("causal", "document")
EOT_ID = 199999  # <|endoftext|> in o200k_base: Blues' packing ends every document with it
# Keys older checkpoints' config.json hold; they are RunOptions now and ignored there.
FORMER_FIELDS = ("loss_chunk_tokens", "gradient_checkpointing", "attn_backend")


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How a BluesLM computes, not what: every choice gives the same function."""

    attn_backend: str = "auto"  # "auto" (flash_attn if importable, else sdpa), "sdpa", "flash_attn"
    gradient_checkpointing: bool = False  # recompute each block in backward (RNG-preserving)
    loss_chunk_tokens: int = 4096  # tokens per chunk of the fused head + cross-entropy
    # "causal": a window is one sequence; "document": attention stops at each EOT_ID join and
    # positions restart per document (for windows scored whole: training, evaluation, lineage)
    attention_mask: str = "causal"

    def __post_init__(self) -> None:
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend {self.attn_backend!r} must be one of {ATTN_BACKENDS}")
        if self.attention_mask not in ATTENTION_MASKS:
            raise ValueError(f"attention_mask {self.attention_mask!r} must be one of {ATTENTION_MASKS}")
        if type(self.loss_chunk_tokens) is not int or self.loss_chunk_tokens < 1:
            raise ValueError(f"loss_chunk_tokens must be a positive integer, got {self.loss_chunk_tokens!r}")


@dataclass(kw_only=True)
class BluesConfig:
    """Every architectural number of a Blues model. `BluesConfig()` is Blues-01."""

    vocab_size: int = 200019  # o200k_base; embedding rows are padded to a multiple of 128
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int = 1  # 1 = multi-query attention
    ffn_hidden: int = 2048  # SwiGLU hidden width of the dense FFN and of each expert
    moe_every: int = 2  # layer i (0-based) is MoE when (i + 1) % moe_every == 0; 1 = all
    n_experts: int = 8
    top_k: int = 2
    router_noise: bool = True  # Shazeer's learned noise, training mode only
    aux_loss_coef: float = 0.01  # weight of BluesOutput.aux_loss in the training loss
    z_loss_coef: float = 0.001  # weight of BluesOutput.z_loss in the training loss
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    init_std: float = 0.02

    def __post_init__(self) -> None:
        problems = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and (type(value) is not int or value < 1):
                problems.append(f"{field.name} must be a positive integer, got {value!r}")
            elif field.type == "float" and (type(value) not in (int, float) or not value >= 0):
                problems.append(f"{field.name} must be a non-negative number, got {value!r}")
            elif field.type == "bool" and type(value) is not bool:
                problems.append(f"{field.name} must be true or false, got {value!r}")
        if problems:
            raise ValueError("invalid BluesConfig: " + "; ".join(problems))
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            problems.append(f"d_model {self.d_model} must split into n_heads {self.n_heads} heads of even width")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")
        if not 1 <= self.top_k <= self.n_experts:
            problems.append(f"top_k {self.top_k} must be between 1 and n_experts {self.n_experts}")
        if not 1 <= self.moe_every <= self.n_layers:
            problems.append(f"moe_every {self.moe_every} must be between 1 (every layer MoE) and n_layers {self.n_layers}")
        if problems:
            raise ValueError("invalid BluesConfig: " + "; ".join(problems))

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // 128) * 128

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layers) if (i + 1) % self.moe_every == 0)

    @classmethod
    def preset(cls, name: str) -> BluesConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def resolve(cls, spec: str) -> BluesConfig:
        """A model by name: a preset (`blues-01`, `tiny`) or a BluesConfig JSON file (`*.json`)."""
        if not spec.endswith(".json"):
            return cls.preset(spec)
        try:
            return cls.from_dict(json.loads(Path(spec).read_text()))
        except OSError as exc:
            raise ValueError(f"cannot read {spec} ({exc.strerror or exc})") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{spec} is not valid JSON ({exc})") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BluesConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a BluesConfig is a JSON object of fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - set(FORMER_FIELDS))
        if unknown:
            raise ValueError(f"unknown BluesConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})


PRESETS: dict[str, dict] = {
    "blues-01": {},
    "tiny": dict(d_model=64, n_layers=4, n_heads=4, n_kv_heads=1, ffn_hidden=128, n_experts=4, max_seq_len=256),
}


def count_parameters(config: BluesConfig) -> dict[str, int]:
    """Closed-form parameter count: `total` stored, `active` used by one token.

    Embedding (tied with the LM head): padded_vocab * d. Per layer: two RMSNorm weights
    (2d), attention q,k,v,o (d * (n_heads + 2 * n_kv_heads) * head_dim + d * d), and either
    a dense SwiGLU FFN (3 * d * ffn_hidden) or a MoE layer (n_experts such FFNs plus the
    router's W_g and W_noise, d * n_experts each). Final RMSNorm: d. A token uses top_k of
    the n_experts experts, so `active` leaves out (n_experts - top_k) FFNs per MoE layer.
    """
    d, hd = config.d_model, config.head_dim
    ffn = 3 * d * config.ffn_hidden
    router = d * config.n_experts * (2 if config.router_noise else 1)
    attn = d * (config.n_heads + 2 * config.n_kv_heads) * hd + d * d
    n_moe = len(config.moe_layers)
    n_dense = config.n_layers - n_moe
    total = (
        config.padded_vocab_size * d
        + config.n_layers * (2 * d + attn)
        + n_dense * ffn
        + n_moe * (config.n_experts * ffn + router)
        + d
    )
    active = total - n_moe * (config.n_experts - config.top_k) * ffn
    return {"total": total, "active": active}


def flops_per_token(config: BluesConfig, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token, for MFU.

    Matmuls: every active matmul weight costs 2 FLOPs per token forward and 4 backward, so
    6 * N, where N is the active parameters minus the RMSNorm weights; the tied embedding
    counts once, as the LM head matmul (the lookup is free). Attention scores and the
    weighted sum of values add 2 * 2 * n_heads * head_dim * seq_len per layer forward, times
    3 for forward + backward: 12 * n_layers * n_heads * head_dim * seq_len. As in nanoGPT
    and PaLM, the causal mask's halving is not subtracted.
    """
    norms = (2 * config.n_layers + 1) * config.d_model
    matmul_params = count_parameters(config)["active"] - norms
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * seq_len
    return 6 * matmul_params + attention
