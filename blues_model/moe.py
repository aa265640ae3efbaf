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

    def forward(self, x_TD: torch.Tensor):
        """Returns (weights_TK, ids_TK, probs_TE, clean_logits_TE), all fp32 but the ids."""
        with torch.autocast(x_TD.device.type, enabled=False):
            x_TD = x_TD.float()
            clean_TE = x_TD @ self.w_gate.float()
            logits_TE = clean_TE
            if self.training and self.w_noise is not None:
                noise_std_TE = F.softplus(x_TD @ self.w_noise.float())
                logits_TE = clean_TE + torch.randn_like(clean_TE) * noise_std_TE
            top_logits_TK, ids_TK = logits_TE.topk(self.top_k, dim=-1)
            return top_logits_TK.softmax(-1), ids_TK, logits_TE.softmax(-1), clean_TE


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
        T, D = x_TD.shape
        E, K = self.w_gate_up.shape[0], self.top_k
        weights_TK, ids_TK, probs_TE, clean_TE = self.router(x_TD)

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

        aux_loss = load_balancing_loss(probs_TE, tokens_per_expert_E, K)
        z_loss = torch.logsumexp(clean_TE, dim=-1).square().mean()
        return out_TD, aux_loss, z_loss, tokens_per_expert_E
