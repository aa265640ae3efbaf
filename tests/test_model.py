"""blues_model: configuration, parameter count, causality, loss, checkpointing (CPU, tiny config)."""

import logging

import pytest
import torch
import torch.nn.functional as F

from blues_model import BluesConfig, BluesLM, RunOptions, count_parameters, flops_per_token
from blues_model.model import chunked_cross_entropy, cross_entropy_chunk, cross_entropy_chunk_eager


def tiny(**overrides) -> BluesConfig:
    """The tiny preset with a 1000-token vocabulary, so CPU backward passes stay fast."""
    return BluesConfig.from_dict({**BluesConfig.preset("tiny").to_dict(), "vocab_size": 1000, **overrides})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BluesLM(BluesConfig.preset("tiny")).eval()


def test_defaults_are_blues01_and_dict_roundtrips():
    c = BluesConfig()
    assert c == BluesConfig.preset("blues-01")
    assert (c.vocab_size, c.padded_vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads) == (
        200019, 200064, 768, 12, 12, 1)
    assert c.moe_layers == (1, 3, 5, 7, 9, 11)
    assert BluesConfig(moe_every=1).moe_layers == tuple(range(12))
    assert BluesConfig.from_dict(tiny().to_dict()) == tiny() != BluesConfig.preset("tiny")
    with pytest.raises(ValueError, match="unknown BluesConfig fields"):
        BluesConfig.from_dict({"d_modle": 8})
    with pytest.raises(ValueError, match="unknown preset"):
        BluesConfig.preset("huge")
    with pytest.raises(ValueError, match="top_k"):
        BluesConfig(top_k=9)


def test_blues01_parameter_count_matches_formula():
    c = BluesConfig()
    with torch.device("meta"):
        meta = BluesLM(c)
    d, V, L, F_, E, K = c.d_model, c.padded_vocab_size, c.n_layers, c.ffn_hidden, c.n_experts, c.top_k
    attn = d * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + d * d
    formula = V * d + L * (2 * d + attn) + 6 * 3 * d * F_ + 6 * (E * 3 * d * F_ + 2 * d * E) + d
    expert_params = sum(p.numel() for n, p in meta.named_parameters() if n.endswith(("w_gate_up", "w_down")))
    stored = sum(p.numel() for p in meta.parameters())
    assert stored == formula == count_parameters(c)["total"] == 423_881_472
    assert count_parameters(c)["active"] == stored - expert_params * (E - K) // E == 254_012_160


def test_flops_per_token_counts_matmul_weights_and_attention():
    c = BluesConfig(moe_every=1)
    with torch.device("meta"):
        meta = BluesLM(c)
    matmul = sum(
        p.numel() * (c.top_k / c.n_experts if n.endswith(("w_gate_up", "w_down")) else 1)
        for n, p in meta.named_parameters() if p.dim() >= 2
    )
    assert flops_per_token(c, 0) == 6 * matmul
    assert flops_per_token(c, 2048) - flops_per_token(c, 0) == 12 * 12 * 12 * 64 * 2048


def test_backend_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="blues_model.attention"):
        BluesLM(tiny(n_layers=2), RunOptions(attn_backend="sdpa"))
    assert [r.getMessage() for r in caplog.records] == ["attention backend: sdpa (requested 'sdpa')"]


def test_later_tokens_never_change_earlier_logits(model):
    ids = torch.randint(0, 200019, (2, 24))
    changed = ids.clone()
    changed[:, 16:] = torch.randint(0, 200019, (2, 8))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :16], b[:, :16])
    assert not torch.allclose(a[:, 16:], b[:, 16:])


def test_outputs_and_router_statistics(model):
    ids = torch.randint(0, 200019, (2, 24))
    out = model(ids)
    c = model.config
    assert out.logits.shape == (2, 24, c.vocab_size) and out.loss is None
    assert out.tokens_per_expert.shape == (len(c.moe_layers), c.n_experts)
    assert out.tokens_per_expert.sum(1).tolist() == [2 * 24 * c.top_k] * len(c.moe_layers)
    assert out.aux_loss.ndim == out.z_loss.ndim == 0 and out.aux_loss >= 1.0 - 1e-6
    every = BluesLM(tiny(n_layers=2, moe_every=1))(ids % 1000)
    assert every.tokens_per_expert.shape == (2, c.n_experts)


def test_chunked_cross_entropy_equals_plain_value_and_grads():
    torch.manual_seed(0)
    vocab, padded = 1000, 1024
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(padded, 16, requires_grad=True)
    labels = torch.randint(0, vocab, (37,))
    labels[[3, 10, 30]] = -100
    plain = F.cross_entropy((h @ w.T)[:, :vocab].float(), labels, ignore_index=-100)
    plain_grads = torch.autograd.grad(plain * 3.0, (h, w))
    chunked = chunked_cross_entropy(h, w, labels, vocab, chunk=8)
    chunked_grads = torch.autograd.grad(chunked * 3.0, (h, w))
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=0)
    for got, want in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert chunked_grads[1][vocab:].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_cross_entropy_chunk_equals_the_compiled_paths_function(dtype):
    """The CPU path (in place) against the function CUDA compiles, padded columns and
    ignored rows included, in both dtypes; every row ignored gives 0 and no gradient."""
    torch.manual_seed(0)
    vocab, padded = 1000, 1024
    logits = (torch.randn(9, padded) * 4).to(dtype)
    target, valid = torch.randint(0, vocab, (9,)), torch.tensor([True] * 6 + [False] * 3)
    want = cross_entropy_chunk(logits, target, valid, vocab, True)
    got = cross_entropy_chunk_eager(logits.clone(), target, valid, vocab, True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7)
    assert got[1].dtype == dtype and got[1][:, vocab:].abs().sum() == 0
    assert cross_entropy_chunk_eager(logits.clone(), target, valid, vocab, False)[1] is None
    nothing = cross_entropy_chunk_eager(logits.clone(), target, torch.zeros(9, dtype=torch.bool), vocab, True)
    assert nothing[0] == 0 and nothing[1].abs().sum() == 0


def test_model_loss_equals_cross_entropy_of_logits():
    torch.manual_seed(0)
    m = BluesLM(tiny(), RunOptions(loss_chunk_tokens=10)).eval()
    ids = torch.randint(0, 1000, (2, 17))
    labels = ids[:, 1:].clone()
    labels[0, :4] = -100
    out = m(ids[:, :-1], labels=labels)
    assert out.logits is None
    used = [p for name, p in m.named_parameters() if not name.endswith("w_noise")]  # noise: training only
    grads = torch.autograd.grad(out.loss, used)
    logits = m(ids[:, :-1]).logits
    plain = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    plain_grads = torch.autograd.grad(plain, used)
    torch.testing.assert_close(out.loss, plain, rtol=1e-6, atol=0)
    for got, want in zip(grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = BluesLM(tiny()).train()
    ckpt = BluesLM(tiny(), RunOptions(gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 1000, (2, 17))
    grads = []
    for m in (plain, ckpt):
        torch.manual_seed(1)
        out = m(ids[:, :-1], labels=ids[:, 1:])
        total = out.loss + 0.01 * out.aux_loss + 0.001 * out.z_loss
        grads.append(torch.autograd.grad(total, list(m.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
