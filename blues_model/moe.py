"""Mixture-of-experts feed-forward: noisy top-k router and dropless grouped SwiGLU experts.

Shape legend (suffixes on tensor names, as in torchtitan):
    T   tokens of the micro-batch, batch and sequence flattened
    D   model width, d_model
    H   hidden width of one expert, ffn_hidden
    E   number of experts
    K   experts per token, top_k
    TK  routed (token, expert) pairs, T * K; "sorted" rows are grouped by expert

Routing (Shazeer et al. 2017, arXiv 1701.06538, Eqs. 3-5): in fp32, on the router's own
copy of the input, logits = x·W_g, plus N(0,1)·softplus(x·W_noise) in training mode only.
Each token goes to its top_k experts with weights softmax(top-k logits), which is the
full softmax renormalized over the chosen k. No capacity: every token is computed
(dropless), so one token's output never depends on the rest of the batch.

Experts: the (token, expert) pairs are sorted by expert and both SwiGLU matmuls run as one
`torch._grouped_mm` each over the 3-D weights w_gate_up [E, D, 2H] (gate block first,
then up) and w_down [E, H, D]. Nothing in forward reads a value back to the host.

Decoding (`MoE.decode`, used by decode.py's captured step) computes the same output for
the few tokens of a decode step without the losses, in one of two dispatches, both free of
host syncs and of data-dependent shapes: "grouped" is forward's sorted `_grouped_mm`
(which reads only the experts some token chose); "dense" runs every expert on every token
as two batched matmuls and weighs the outputs by the routing weights, zero for the experts
a token did not choose (E / K times the arithmetic, no sort, no gather); "gather" reads
each (token, expert) pair's expert weights by index inside the product (no sort, no copy;
T*K experts' bytes, so for a handful of tokens only).
Float32 weights on CUDA cannot take "grouped": there `_grouped_mm` falls back to a loop
that reads the offsets back to the host.

Auxiliary-loss-free balancing (DeepSeek-V3, arXiv 2412.19437, Sec. 2.1.2): each router
holds a per-expert bias, a buffer (no gradient, saved with the weights, zero until trained),
added to the logits for the top-k choice only; the weights stay the softmax of the chosen
experts' unbiased logits. After an optimizer step `Router.nudge_bias` moves it by `rate`
towards even load: down for experts above the mean share, up for those below.

Losses, per layer: load balancing in the Switch convention (arXiv 2101.03961, Eq. 4),
E * sum_e f_e * P_e, where f_e is the share of the T*K routed pairs sent to expert e and
P_e the mean routing probability of expert e; it is exactly 1.0 when both are uniform
(1/E) and E/K when every token picks the same K experts with certainty. Router z-loss
(ST-MoE, arXiv 2202.08906, Eq. 5): mean over tokens of logsumexp(clean logits)^2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import BluesConfig

DISPATCHES = ("dense", "grouped", "gather")  # MoE.decode's ways to reach the experts
EXPERT_BIAS = "expert_bias"  # the Router buffer; weights saved before it existed load it as zeros


def zero_bias_if_absent(router, state_dict, prefix, *args) -> None:
    """Router load_state_dict pre-hook: a state dict without the bias routes without one."""
    state_dict.setdefault(prefix + EXPERT_BIAS, torch.zeros(router.expert_bias.shape))


def load_balancing_loss(probs_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor, top_k: int) -> torch.Tensor:
    n_experts = probs_TE.shape[1]
    f_E = tokens_per_expert_E.float() / (probs_TE.shape[0] * top_k)
    return n_experts * (f_E * probs_TE.mean(0)).sum()


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick; `torch._grouped_mm` is not on autocast's list."""
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


class Router(nn.Module):
    def __init__(self, config: BluesConfig):
        super().__init__()
        self.top_k = config.top_k
        self.w_gate = nn.Parameter(torch.empty(config.d_model, config.n_experts))
        self.w_noise = nn.Parameter(torch.empty(config.d_model, config.n_experts)) if config.router_noise else None
        self.register_buffer(EXPERT_BIAS, torch.zeros(config.n_experts))
        self._register_load_state_dict_pre_hook(zero_bias_if_absent, with_module=True)

    def _apply(self, fn, recurse=True):
        """As nn.Module's, but the bias stays float32 (a bf16 model would round its small steps away)."""
        super()._apply(fn, recurse)
        self.expert_bias = self.expert_bias.float()
        return self

    @torch.no_grad()
    def nudge_bias(self, share_E: torch.Tensor, rate: float) -> None:
        """One balancing step from each expert's share of the routed tokens (summing to 1)."""
        self.expert_bias += rate * torch.sign(1.0 / share_E.numel() - share_E.to(self.expert_bias))

    def top_k_of(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights_TK, ids_TK): the top_k experts by biased logit, weighted by the softmax of their logits."""
        ids_TK = (logits_TE + self.expert_bias).topk(self.top_k, dim=-1).indices
        return logits_TE.gather(1, ids_TK).softmax(-1), ids_TK

    def forward(self, x_TD: torch.Tensor):
        """Returns (weights_TK, ids_TK, probs_TE, clean_logits_TE), all fp32 but the ids."""
        with torch.autocast(x_TD.device.type, enabled=False):
            x_TD = x_TD.float()
            clean_TE = x_TD @ self.w_gate.float()
            logits_TE = clean_TE
            if self.training and self.w_noise is not None:
                noise_std_TE = F.softplus(x_TD @ self.w_noise.float())
                logits_TE = clean_TE + torch.randn_like(clean_TE) * noise_std_TE
            weights_TK, ids_TK = self.top_k_of(logits_TE)
            return weights_TK, ids_TK, logits_TE.softmax(-1), clean_TE


    def choose(self, x_TD: torch.Tensor):
        """Eval-mode routing as forward's, for decoding: (weights_TK, ids_TK). The top-k is k
        successive arg-maxes, which torch.compile fuses with the softmax (topk is a library
        kernel of its own); the same experts, in the same order, unless two logits tie."""
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = x_TD.float() @ self.w_gate.float()
            scores_TE, ids = logits_TE + self.expert_bias, []
            for _ in range(self.top_k):
                id_T1 = scores_TE.argmax(-1, keepdim=True)
                ids.append(id_T1)
                scores_TE = scores_TE.scatter(-1, id_T1, float("-inf"))
            ids_TK = torch.cat(ids, -1)
            return logits_TE.gather(1, ids_TK).softmax(-1), ids_TK


class MoE(nn.Module):
    def __init__(self, config: BluesConfig):
        super().__init__()
        E, D, H = config.n_experts, config.d_model, config.ffn_hidden
        self.top_k = config.top_k
        self.router = Router(config)
        self.w_gate_up = nn.Parameter(torch.empty(E, D, 2 * H))
        self.w_down = nn.Parameter(torch.empty(E, H, D))

    def forward(self, x_TD: torch.Tensor):
        """x [T, D] -> (out [T, D], aux_loss, z_loss, tokens_per_expert [E] int64)."""
        weights_TK, ids_TK, probs_TE, clean_TE = self.router(x_TD)
        out_TD, tokens_per_expert_E = self.grouped_experts(x_TD, weights_TK, ids_TK)
        aux_loss = load_balancing_loss(probs_TE, tokens_per_expert_E, self.top_k)
        z_loss = torch.logsumexp(clean_TE, dim=-1).square().mean()
        return out_TD, aux_loss, z_loss, tokens_per_expert_E

    def grouped_experts(self, x_TD, weights_TK, ids_TK):
        """Sorted dispatch: -> (sum_k weight_k * expert_k(x) [T, D], tokens_per_expert [E])."""
        T, D = x_TD.shape
        E, K = self.w_gate_up.shape[0], self.top_k
        ids_flat_TK = ids_TK.flatten()
        tokens_per_expert_E = torch.zeros(E, dtype=torch.int64, device=x_TD.device)
        tokens_per_expert_E.scatter_add_(0, ids_flat_TK, torch.ones_like(ids_flat_TK))
        offsets_E = tokens_per_expert_E.cumsum(0).to(torch.int32)
        sorted_to_pair_TK = ids_flat_TK.argsort(stable=True)
        token_of_sorted_TK = sorted_to_pair_TK // K

        dtype = compute_dtype(self.w_gate_up)
        x_sorted_TKD = x_TD.to(dtype).index_select(0, token_of_sorted_TK)
        gate_up_TK2H = torch._grouped_mm(x_sorted_TKD, self.w_gate_up.to(dtype), offs=offsets_E)
        gate_TKH, up_TKH = gate_up_TK2H.chunk(2, dim=-1)
        y_sorted_TKD = torch._grouped_mm(F.silu(gate_TKH) * up_TKH, self.w_down.to(dtype), offs=offsets_E)

        pair_to_sorted_TK = torch.empty_like(sorted_to_pair_TK).scatter_(
            0, sorted_to_pair_TK, torch.arange(T * K, device=x_TD.device)
        )
        y_TKD = y_sorted_TKD.index_select(0, pair_to_sorted_TK).view(T, K, D)
        out_TD = (y_TKD * weights_TK.to(dtype).unsqueeze(-1)).sum(dim=1)
        return out_TD, tokens_per_expert_E

    def dense_experts(self, x_TD, weights_TK, ids_TK):
        """Every expert on every token: -> sum_e combine[t, e] * expert_e(x) [T, D], where
        combine holds the routing weight of each chosen expert and 0 elsewhere."""
        dtype = compute_dtype(self.w_gate_up)
        combine_TE = torch.zeros(x_TD.shape[0], self.w_gate_up.shape[0], device=x_TD.device, dtype=weights_TK.dtype)
        combine_TE = combine_TE.scatter(1, ids_TK, weights_TK)
        gate_up_ET2H = torch.matmul(x_TD.to(dtype), self.w_gate_up.to(dtype))
        gate_ETH, up_ETH = gate_up_ET2H.chunk(2, dim=-1)
        y_ETD = torch.bmm(F.silu(gate_ETH) * up_ETH, self.w_down.to(dtype))
        return (y_ETD * combine_TE.T.to(dtype).unsqueeze(-1)).sum(dim=0)

    def gathered_experts(self, x_TD, weights_TK, ids_TK, experts_t=None):
        """Each (token, expert) pair against that expert's weights, read by index inside the
        product (a multiply and a float32 sum, which torch.compile turns into one reduction
        kernel per projection that reads only the T*K chosen experts' weights: no sort, no
        copy): -> sum_k weight_k * expert_k(x) [T, D]. `experts_t` = (w_gate_up [E, 2H, D],
        w_down [E, D, H]), the weights transposed so that each sum runs along contiguous
        memory (default: transposed views of the parameters). For the few tokens of a small
        decode batch; eagerly it materializes [T*K, 2H, D] products."""
        T, D = x_TD.shape
        dtype = compute_dtype(self.w_gate_up)
        w_gate_up_E2HD, w_down_EDH = experts_t or (self.w_gate_up.transpose(1, 2), self.w_down.transpose(1, 2))
        ids_flat_TK = ids_TK.flatten()
        x_TKD = x_TD.to(dtype).repeat_interleave(self.top_k, dim=0)
        w_TK2HD = w_gate_up_E2HD.to(dtype)[ids_flat_TK]
        gate_up_TK2H = (x_TKD.float().unsqueeze(1) * w_TK2HD.float()).sum(-1).to(dtype)
        gate_TKH, up_TKH = gate_up_TK2H.chunk(2, dim=-1)
        h_TKH = F.silu(gate_TKH) * up_TKH
        w_TKDH = w_down_EDH.to(dtype)[ids_flat_TK]
        y_TKD = (h_TKH.float().unsqueeze(1) * w_TKDH.float()).sum(-1).to(dtype)
        return (y_TKD.view(T, self.top_k, D) * weights_TK.to(dtype).unsqueeze(-1)).sum(dim=1)

    def decode(self, x_TD: torch.Tensor, dispatch: str = "dense", experts_t=None) -> torch.Tensor:
        """x [T, D] -> out [T, D] as forward computes it (eval mode), without the losses.
        `experts_t`: transposed expert weights for "gather" (see gathered_experts)."""
        weights_TK, ids_TK = self.router.choose(x_TD)
        if dispatch == "grouped":
            return self.grouped_experts(x_TD, weights_TK, ids_TK)[0]
        if dispatch == "dense":
            return self.dense_experts(x_TD, weights_TK, ids_TK)
        if dispatch == "gather":
            return self.gathered_experts(x_TD, weights_TK, ids_TK, experts_t)
        raise ValueError(f"MoE dispatch {dispatch!r} must be one of {DISPATCHES}")
