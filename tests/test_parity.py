"""Loss parity: a short training run of the fast path equals the plain reference path.

Fast path: grouped-GEMM expert dispatch and the chunked fused cross-entropy (what
`blues train` and the GPU benchmark run). Reference path: the same weights with every MoE
layer computed token by token, expert by expert, and the cross-entropy of the full
logits. Both take the same AdamW steps on the same real tokens, in float32 on the CPU.
"""

import copy

import torch
import torch.nn.functional as F
from reference import naive_moe
from training_runs import LR, MODEL

from blues_model import BluesConfig, BluesLM, RunOptions
from blues_model.moe import MoE
from blues_train.mixture.loader import PackedSequenceDataset
from blues_train.mixture.merge import merge


def reference_moe_forward(moe: MoE, x_TD):
    """Per-token routing and expert loop: (out, aux_loss, z_loss, tokens_per_expert)."""
    out_TD, z_loss, counts_E = naive_moe(moe, x_TD)
    share_E = counts_E.float() / counts_E.sum()
    probs_TE = (x_TD @ moe.router.w_gate).softmax(-1)
    aux_loss = len(counts_E) * (share_E * probs_TE.mean(0)).sum()
    return out_TD, aux_loss, z_loss, counts_E


def use_reference_moe(model: BluesLM) -> None:
    for module in model.modules():
        if isinstance(module, MoE):
            module.forward = lambda x, m=module: reference_moe_forward(m, x)


def total_loss(out, config, loss):
    return loss + config.aux_loss_coef * out.aux_loss + config.z_loss_coef * out.z_loss


def test_fast_path_losses_equal_reference_path(code_store, prose_store, tmp_path):
    merge([code_store, prose_store], tmp_path / "mix", strategy="equal")
    stream = iter(PackedSequenceDataset(tmp_path / "mix", 32, seed=0))
    batches = [torch.stack([next(stream) for _ in range(4)]) for _ in range(6)]

    config = BluesConfig.from_dict({**BluesConfig.resolve(MODEL).to_dict(), "router_noise": False})
    torch.manual_seed(0)
    fast = BluesLM(config, RunOptions(loss_chunk_tokens=48))
    reference = copy.deepcopy(fast)
    use_reference_moe(reference)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=LR) for m in (fast, reference)]

    fast_losses, reference_losses = [], []
    for windows in batches:
        inputs, labels = windows[:, :-1], windows[:, 1:]
        out = fast(inputs, labels=labels)
        total_loss(out, config, out.loss).backward()
        fast_losses.append(out.loss.item())

        ref_out = reference(inputs)
        vocab = config.vocab_size
        ce = F.cross_entropy(ref_out.logits[..., :vocab].flatten(0, 1), labels.flatten())
        total_loss(ref_out, config, ce).backward()
        reference_losses.append(ce.item())
        for opt in optimizers:
            opt.step()
            opt.zero_grad()

    assert fast_losses[-1] < fast_losses[0] - 0.5  # it trains, so the comparison means something
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(reference_losses), rtol=1e-4, atol=0)
