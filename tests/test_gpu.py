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


def decode_model(dtype, **overrides):
    torch.manual_seed(0)
    config = tiny(vocab_size=4096, init_std=0.2, max_seq_len=128, **overrides)  # spread logits: no near-ties
    return BluesLM(config).to("cuda", dtype).eval()


def decode_prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 4096, (n,), generator=g).tolist() for n in (5, 1, 17, 9)]


def left_padded_on_cuda(prompts):
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device="cuda")
    valid = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts], device="cuda")
    return ids, valid


@pytest.mark.parametrize("dispatch", ["dense", "gather"])
@pytest.mark.parametrize("moe_every", [2, 1])
def test_cuda_graph_greedy_equals_eager_fp32(dispatch, moe_every):
    """Float32: both paths are exact to ~1e-6, so the greedy tokens must be the same."""
    from blues_model.decode import StaticDecoder
    from blues_model.generation import generate

    model = decode_model(torch.float32, moe_every=moe_every)
    prompts = decode_prompts()
    eager = generate(model, prompts, max_new_tokens=40, temperature=0, eos_id=None, fast=False)
    ids, valid = left_padded_on_cuda(prompts)
    dec = StaticDecoder(model, len(prompts), ids.shape[1] + 40, greedy=True, moe_dispatch=dispatch)
    assert dec.graph is not None and dec.compile
    for _ in range(2):  # the graph is reused: the second call starts from an emptied cache
        fast = dec.generate(ids, valid, 40, lambda logits: logits.argmax(-1), None).tolist()
        assert fast == eager


@pytest.mark.parametrize("dispatch", ["dense", "grouped", "gather"])
@pytest.mark.parametrize("moe_every", [2, 1])
def test_cuda_graph_logits_follow_eager_bf16(dispatch, moe_every):
    """bf16: the fused kernels round differently from eager's, so a near-tie may pick another
    token; fed the eager path's greedy tokens, the graph's logits must stay within bf16
    rounding of eager's at every step and agree on the argmax almost everywhere."""
    from blues_model import KVCache
    from blues_model.decode import StaticDecoder
    from blues_model.generation import generate

    model = decode_model(torch.bfloat16, moe_every=moe_every)
    prompts = decode_prompts()
    tokens = torch.tensor(generate(model, prompts, max_new_tokens=40, temperature=0, eos_id=None, fast=False),
                          device="cuda")
    ids, valid = left_padded_on_cuda(prompts)
    S = ids.shape[1] + tokens.shape[1]
    with torch.inference_mode():
        cache = KVCache(model.config, len(prompts), S, device="cuda", dtype=torch.bfloat16)
        want = [model(ids, attention_mask=valid, kv_cache=cache, last_only=True).logits[:, -1]]
        want += [model(tokens[:, t : t + 1], kv_cache=cache).logits[:, -1] for t in range(tokens.shape[1] - 1)]
        dec = StaticDecoder(model, len(prompts), S, greedy=False, moe_dispatch=dispatch)
        dec.refresh_weights()
        got = [dec.prefill(ids, valid).clone()]
        for t in range(tokens.shape[1] - 1):
            dec.ids_B.copy_(tokens[:, t])
            got.append(dec.advance().clone())
    got, want = torch.stack(got).float(), torch.stack(want).float()
    rel_per_step = (got - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1)
    assert rel_per_step.max() < 3e-2, rel_per_step
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95


def test_generate_on_cuda_takes_the_graph_and_samples_like_eager():
    from blues_model import decode
    from blues_model.generation import generate

    model = decode_model(torch.float32)

    def run(fast):
        return generate(model, decode_prompts(), max_new_tokens=30, temperature=1.0, top_p=0.9, top_k=50,
                        eos_id=None, generator=torch.Generator(device="cuda").manual_seed(7), fast=fast)
    assert run(None) == run(False)
    assert decode._decoders[model][1].graph is not None  # the default on CUDA was the captured path
    greedy = generate(model, decode_prompts(), max_new_tokens=30, temperature=0, eos_id=None)
    eos = greedy[2][5]
    assert generate(model, decode_prompts(), 30, temperature=0, eos_id=eos) == \
        generate(model, decode_prompts(), 30, temperature=0, eos_id=eos, fast=False)


@pytest.mark.parametrize("dtype, dispatch", [(torch.float32, "dense"), (torch.float32, "gather"),
                                             (torch.bfloat16, "grouped")])
def test_decode_step_has_no_host_sync(dtype, dispatch):
    from blues_model.decode import StaticDecoder

    model = decode_model(dtype)
    dec = StaticDecoder(model, 3, 32, greedy=True, moe_dispatch=dispatch, compile=False, graph=False)
    dec.step()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            dec.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_document_masking_through_flex_attention_equals_the_cpu_reference():
    """The attention layer with FlexAttention's compiled block mask (CUDA) against SDPA with the
    dense mask (CPU), fp32: the kernel and the mask, apart from the MoE (whose grouped GEMM on
    CUDA takes bf16 only)."""
    from blues_model.attention import Attention, document_dense_mask, document_mask, documents
    from blues_model.config import EOT_ID

    torch.manual_seed(0)
    config = tiny()
    layer = Attention(config, 0, "sdpa").eval()
    ids = torch.randint(0, 200_000, (2, 256))
    ids[0, [17, 90, 91, 200]] = EOT_ID
    doc_BT, _ = documents(ids)
    q = torch.randn(2, 256, config.n_heads, config.head_dim)
    k, v = (torch.randn(2, 256, config.n_kv_heads, config.head_dim) for _ in range(2))
    with torch.no_grad():
        want = layer.attend(q, k, v, document_dense_mask(doc_BT))
        layer = layer.cuda()
        got = layer.attend(q.cuda(), k.cuda(), v.cuda(), document_mask(doc_BT.cuda())).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
