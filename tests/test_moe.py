"""MoE layer: grouped dispatch vs a per-token loop, dense equivalence, losses, router noise."""

import pytest
import torch
from reference import naive_moe

from blues_model import BluesConfig
from blues_model.model import BluesLM, SwiGLU
from blues_model.moe import MoE, load_balancing_loss


def make_moe(**overrides) -> MoE:
    config = BluesConfig.from_dict({**BluesConfig.preset("tiny").to_dict(), **overrides})
    moe = MoE(config)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.3)
    return moe


def test_grouped_dispatch_equals_per_token_reference_outputs_and_grads():
    torch.manual_seed(0)
    moe = make_moe().eval()
    x = torch.randn(40, 64, requires_grad=True)
    out, _, z_loss, counts = moe(x)
    ref, ref_z, ref_counts = naive_moe(moe, x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(z_loss, ref_z)
    assert counts.tolist() == ref_counts.tolist()
    upstream = torch.randn_like(out)
    inputs = [x, moe.router.w_gate, moe.w_gate_up, moe.w_down]
    grads = torch.autograd.grad((out * upstream).sum() + z_loss, inputs)
    ref_grads = torch.autograd.grad((ref * upstream).sum() + ref_z, inputs)
    for got, want in zip(grads, ref_grads):  # fp32 summation order differs: tolerance relative to the scale
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_one_expert_equals_dense_swiglu():
    torch.manual_seed(0)
    moe = make_moe(n_experts=1, top_k=1).eval()
    dense = SwiGLU(64, 128)
    with torch.no_grad():
        dense.gate_up.weight.copy_(moe.w_gate_up[0].T)
        dense.down.weight.copy_(moe.w_down[0].T)
    x = torch.randn(30, 64)
    out = moe(x)[0]
    torch.testing.assert_close(out, dense(x))
    moe_grads = torch.autograd.grad(out.square().sum(), [moe.w_gate_up, moe.w_down])
    dense_grads = torch.autograd.grad(dense(x).square().sum(), [dense.gate_up.weight, dense.down.weight])
    torch.testing.assert_close(moe_grads[0][0], dense_grads[0].T)
    torch.testing.assert_close(moe_grads[1][0], dense_grads[1].T)


def test_balancing_loss_is_one_when_uniform_and_grows_when_collapsed():
    E, K, T = 4, 2, 8
    assert load_balancing_loss(torch.full((T, E), 1 / E), torch.full((E,), T * K // E), K).item() == 1.0

    moe = make_moe(router_noise=False).eval()
    with torch.no_grad():
        moe.router.w_gate.zero_()
        moe.router.w_gate[:E, :E] = torch.eye(E)
    x = torch.zeros(T, 64)
    for t in range(T):  # token t prefers experts t and t+1 (mod E): every expert twice per E tokens
        x[t, t % E] = x[t, (t + 1) % E] = 3.0
    _, aux, _, counts = moe(x)
    assert counts.tolist() == [T * K // E] * E
    torch.testing.assert_close(aux, torch.tensor(1.0), rtol=0, atol=1e-6)

    x_collapsed = x[:1].repeat(T, 1) * 10  # every token picks experts 0 and 1 with near certainty
    _, aux_collapsed, _, counts = moe(x_collapsed)
    assert counts.tolist() == [T, T, 0, 0]
    assert aux_collapsed > 1.9  # the limit is E / K = 2


def test_router_noise_only_in_training_mode():
    torch.manual_seed(0)
    moe = make_moe()
    x = torch.randn(64, 64)
    clean = moe.router.eval()(x)
    assert torch.equal(clean[0], moe.router(x)[0])
    torch.testing.assert_close(clean[3].softmax(-1), clean[2])  # eval: probabilities from the clean logits
    moe.router.train()
    noisy_a, noisy_b = moe.router(x), moe.router(x)
    assert not torch.equal(noisy_a[2], noisy_b[2])
    assert not torch.equal(noisy_a[2], clean[2])
    torch.testing.assert_close(noisy_a[3], clean[3])  # the z-loss sees the clean logits


def test_bf16_autocast_runs_grouped_experts_in_bf16():
    torch.manual_seed(0)
    moe = make_moe().eval()
    x = torch.randn(24, 64)
    ref = moe(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x)[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


@pytest.mark.parametrize("moe_every", [1, 2])
def test_model_trains_with_all_or_alternating_moe_layers(moe_every):
    torch.manual_seed(0)
    config = BluesConfig.from_dict({**BluesConfig.preset("tiny").to_dict(), "moe_every": moe_every, "n_layers": 2})
    model = BluesLM(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 9))
    out = model(ids[:, :-1], labels=ids[:, 1:])
    (out.loss + config.aux_loss_coef * out.aux_loss + config.z_loss_coef * out.z_loss).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
