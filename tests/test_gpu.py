"""The fast path on a GPU: bf16 grouped experts, chunked loss and no host syncs.

Skipped without CUDA (CI); run on the GPU machine with `python -m pytest -q -m gpu`.
"""

import pytest
import torch
import torch.nn.functional as F

from blues_model import BluesConfig, BluesLM, RunOptions
from blues_model.moe import MoE

pytestmark = pytest.mark.gpu


def tiny(**overrides) -> BluesConfig:
    return BluesConfig.from_dict({**BluesConfig.preset("tiny").to_dict(), **overrides})


def test_bf16_moe_matches_fp32_reference():
    torch.manual_seed(0)
    moe = MoE(tiny(d_model=128, ffn_hidden=256, n_experts=8)).cuda().eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.05)
    x = torch.randn(4096, 128, device="cuda")
    want, *_ = moe(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, *_ = moe(x)
    rel = (got.float() - want).norm() / want.norm()
    assert rel < 1e-2


def test_chunked_loss_equals_cross_entropy_on_cuda():
    torch.manual_seed(0)
    model = BluesLM(tiny(), RunOptions(loss_chunk_tokens=256)).cuda().eval()
    ids = torch.randint(0, 200_000, (4, 257), device="cuda")
    loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
    logits = model(ids[:, :-1]).logits
    plain = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-5)


def test_training_step_has_no_host_sync():
    torch.manual_seed(0)
    model = BluesLM(tiny()).cuda().train()
    ids = torch.randint(0, 200_000, (2, 129), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids[:, :-1], labels=ids[:, 1:])
        (out.loss + 0.01 * out.aux_loss + 0.001 * out.z_loss).backward()

    step()  # warm-up: compiles the loss chunk and fills the caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
