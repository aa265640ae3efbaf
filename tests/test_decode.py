"""The static decode step (decode.py) against the eager loop, on the CPU: the same step that
CUDA captures in a graph, here run eagerly (no compile, no graph), must give the eager
path's logits and its greedy and seeded-sampled tokens. tests/test_gpu.py repeats the
comparison with compile and the CUDA graph."""

import pytest
import torch

from blues_model import BluesConfig, BluesLM, KVCache
from blues_model.decode import StaticDecoder
from blues_model.generation import generate, sample_next


def tiny(**overrides) -> BluesConfig:
    small = {"vocab_size": 1000, "init_std": 0.2, "max_seq_len": 24}  # small head: fast on CPU
    return BluesConfig.from_dict({**BluesConfig.preset("tiny").to_dict(), **small, **overrides})


@pytest.fixture(scope="module", params=[2, 1], ids=["alternating", "every_layer_moe"])
def model(request):
    torch.manual_seed(0)
    return BluesLM(tiny(moe_every=request.param)).eval()


def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 1, 9)]


def left_padded(rows):
    P = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (P - len(r)) + r for r in rows])
    valid = torch.tensor([[False] * (P - len(r)) + [True] * len(r) for r in rows])
    return ids, valid


@pytest.mark.parametrize("dispatch", ["dense", "grouped", "gather"])
def test_static_step_logits_equal_eager_cache_logits(model, dispatch):
    ids, valid = left_padded(prompts())
    feed = torch.randint(0, 1000, (3, 6), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        cache = KVCache(model.config, 3, ids.shape[1] + feed.shape[1])
        want = [model(ids, attention_mask=valid, kv_cache=cache).logits[:, -1]]
        want += [model(feed[:, t : t + 1], kv_cache=cache).logits[:, -1] for t in range(feed.shape[1])]
        dec = StaticDecoder(model, 3, ids.shape[1] + feed.shape[1], greedy=False, moe_dispatch=dispatch)
        assert dec.graph is None and not dec.compile  # the CPU runs the step eagerly
        got = [dec.prefill(ids, valid)]
        for t in range(feed.shape[1]):
            dec.ids_B.copy_(feed[:, t])
            got.append(dec.advance().clone())
    for step, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step}: {m}")
    assert int(dec.slot_1) == ids.shape[1] + feed.shape[1]
    assert dec.cache.valid[:, ids.shape[1]:].all() and (dec.cache.valid[:, : ids.shape[1]] == valid).all()


@pytest.mark.parametrize("dispatch", ["dense", "grouped", "gather"])
def test_dense_and_grouped_moe_decode_equal_forward(dispatch):
    torch.manual_seed(1)
    moe = BluesLM(tiny()).blocks[1].ffn.eval()
    x = torch.randn(7, moe.w_gate_up.shape[1])
    with torch.no_grad():
        want = moe(x)[0]
        got = moe.decode(x, dispatch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dispatch"):
        moe.decode(x, "loop")


def test_static_greedy_equals_eager_greedy(model):
    eager = generate(model, prompts(), max_new_tokens=12, temperature=0, eos_id=None, fast=False)
    static = generate(model, prompts(), max_new_tokens=12, temperature=0, eos_id=None, fast=True)
    assert static == eager
    assert [len(row) for row in static] == [12, 12, 12]
    # a second call reuses the decoder (emptied cache) and still agrees; stopping at max_seq_len too
    long = generate(model, prompts(), max_new_tokens=100, temperature=0, eos_id=None, fast=True)
    assert long == generate(model, prompts(), max_new_tokens=100, temperature=0, eos_id=None, fast=False)
    assert [len(row) for row in long] == [24 - 9] * 3


def test_static_sampling_repeats_eager_draws(model):
    def run(fast):
        return generate(model, prompts(), max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, eos_id=None,
                        generator=torch.Generator().manual_seed(7), fast=fast)
    assert run(True) == run(False)


def test_static_decoding_stops_at_eos_like_eager(model):
    eager = generate(model, prompts(), max_new_tokens=20, temperature=0, eos_id=None, fast=False)
    eos = eager[0][3]  # a token row 0 produces: that row ends there, the others where they meet it
    want = generate(model, prompts(), max_new_tokens=20, temperature=0, eos_id=eos, fast=False)
    got = generate(model, prompts(), max_new_tokens=20, temperature=0, eos_id=eos, fast=True)
    assert got == want and len(got[0]) == eager[0].index(eos)
    first = eager[0][0]
    assert generate(model, prompts()[:1], max_new_tokens=30, temperature=0, eos_id=first, fast=True) == [[]]


def test_greedy_feedback_takes_first_argmax_of_real_vocabulary_and_advances():
    from blues_model.decode import argmax_over_vocab, greedy_feedback

    dec = StaticDecoder(BluesLM(tiny()).eval(), 3, 8, greedy=True)
    logits = torch.randn(3, 1024, generator=torch.Generator().manual_seed(0))  # 1000 real ids, padded to 1024
    logits[0, 1010] = 99.0  # a padding column never wins
    logits[1, [700, 70, 300]] = 50.0  # ties: the first maximum, as torch.argmax
    logits[2, :] = -1.0  # all equal: id 0
    want = logits[:, :1000].argmax(-1)
    assert want.tolist()[1:] == [70, 0]
    assert argmax_over_vocab(logits, 1000).tolist() == want.tolist()
    assert argmax_over_vocab(logits[:, :1000], 1000).tolist() == want.tolist()  # not a multiple of 128
    dec.slot_1.fill_(3)
    greedy_feedback(logits, 1000, dec.ids_B, dec.tokens_BS, dec.slot_1)
    assert dec.ids_B.tolist() == want.tolist() == sample_next(logits[:, :1000], temperature=0).tolist()
    assert dec.tokens_BS[:, 4].tolist() == want.tolist() and int(dec.slot_1) == 4


def test_router_choose_equals_forward_routing():
    torch.manual_seed(2)
    moe = BluesLM(tiny(n_experts=8, top_k=3)).blocks[1].ffn.eval()
    x = torch.randn(64, moe.w_gate_up.shape[1])
    weights, ids, _, _ = moe.router(x)
    got_weights, got_ids = moe.router.choose(x)
    assert torch.equal(got_ids, ids)
    torch.testing.assert_close(got_weights, weights, rtol=0, atol=0)


def test_whole_step_scope_equals_per_block_scope(model):
    ids, valid = left_padded(prompts())
    rows = {}
    for scope in ("block", "step"):
        dec = StaticDecoder(model, 3, ids.shape[1] + 8, greedy=True, scope=scope)
        rows[scope] = dec.generate(ids, valid, 8, lambda logits: logits.argmax(-1), None).tolist()
    assert rows["step"] == rows["block"] == generate(model, prompts(), 8, temperature=0, eos_id=None, fast=False)


def test_reused_decoder_sees_weights_changed_in_place():
    torch.manual_seed(4)
    model = BluesLM(tiny()).eval()
    prompt = prompts()[:1]  # one row: 2 (token, expert) pairs <= 4 experts, so the "gather" dispatch
    before = generate(model, prompt, 8, temperature=0, eos_id=None, fast=True)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))  # an optimizer step would do the same
    after = generate(model, prompt, 8, temperature=0, eos_id=None, fast=True)
    assert after == generate(model, prompt, 8, temperature=0, eos_id=None, fast=False)
    assert after != before


def test_held_decoder_does_not_keep_its_model_alive():
    import gc
    import weakref

    from blues_model import decode

    model = BluesLM(tiny()).eval()
    generate(model, prompts(), 2, temperature=0, eos_id=None, fast=True)
    assert model in decode._decoders
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None
