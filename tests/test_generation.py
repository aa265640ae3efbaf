"""KV-cache decoding, batched prompts, sampling and sliding-window perplexity (CPU, tiny config)."""

import math

import pytest
import torch

from blues_model import BluesConfig, BluesLM, KVCache
from blues_model.generation import generate, perplexity


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    overrides = {"vocab_size": 1000, "init_std": 0.2, "max_seq_len": 16}  # small head: fast on CPU
    config = BluesConfig.from_dict({**BluesConfig.preset("tiny").to_dict(), **overrides})
    return BluesLM(config).eval()


def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 1, 9)]


def test_kv_cache_decoding_gives_full_forward_logits(model):
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config, batch_size=2, max_len=12)
        steps = [model(ids[:, :7], kv_cache=cache).logits]
        steps += [model(ids[:, t : t + 1], kv_cache=cache).logits for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_batch_of_different_lengths_equals_individual_runs(model):
    batch = generate(model, prompts(), max_new_tokens=6, temperature=0, eos_id=None)
    alone = [generate(model, [p], max_new_tokens=6, temperature=0, eos_id=None)[0] for p in prompts()]
    assert batch == alone
    assert [len(row) for row in batch] == [6, 6, 6]


def test_padded_batch_logits_equal_individual_logits(model):
    short, long = prompts()[0], prompts()[2]
    ids = torch.tensor([[0] * (len(long) - len(short)) + short, long])
    mask = ids != 0
    mask[1] = True
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        alone = model(torch.tensor([short])).logits
    torch.testing.assert_close(batched[0, -len(short) :], alone[0], rtol=1e-5, atol=1e-5)


def test_generation_stops_at_max_seq_len_and_at_eos(model):
    out = generate(model, prompts(), max_new_tokens=100, temperature=0, eos_id=None)
    assert [len(row) for row in out] == [16 - 9] * 3
    first = out[0][0]
    stopped = generate(model, prompts()[:1], max_new_tokens=5, temperature=0, eos_id=first)
    assert stopped == [[]]
    with pytest.raises(ValueError, match="every prompt needs"):
        generate(model, [[1] * 16], max_new_tokens=1)


def test_top_k_1_sampling_equals_greedy(model):
    greedy = generate(model, prompts(), max_new_tokens=5, temperature=0, eos_id=None)
    sampled = generate(model, prompts(), max_new_tokens=5, temperature=1.5, top_k=1, eos_id=None,
                       generator=torch.Generator().manual_seed(0))
    assert sampled == greedy


def test_seeded_sampling_repeats(model):
    def run(seed):
        return generate(model, prompts(), max_new_tokens=6, temperature=1.0, top_p=0.9, top_k=50, eos_id=None,
                        generator=torch.Generator().manual_seed(seed))
    assert run(7) == run(7)
    assert run(7) != run(8)
    assert all(0 <= t < model.config.vocab_size for row in run(9) for t in row)  # never a padded row


def test_perplexity_of_short_text_is_exp_of_loss(model):
    ids = torch.randint(0, 1000, (10,))
    with torch.no_grad():
        loss = model(ids[None, :-1], labels=ids[None, 1:]).loss
    assert perplexity(model, ids) == pytest.approx(math.exp(loss.item()), rel=1e-6)


def test_perplexity_sliding_window_matches_per_token_reference(model):
    ids = torch.randint(0, 1000, (37,))
    window, stride = model.config.max_seq_len, 6
    nll = 0.0
    with torch.no_grad():
        for i in range(1, len(ids)):  # target i is scored by the first window reaching it
            start = max(0, math.ceil((i - window) / stride)) * stride
            logits = model(ids[None, start:i]).logits[0, -1]
            nll -= torch.log_softmax(logits.double(), -1)[ids[i]].item()
    assert perplexity(model, ids, stride=stride) == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)


def test_top_p_zero_is_greedy(model):
    greedy = generate(model, prompts(), max_new_tokens=5, temperature=0, eos_id=None)
    nucleus = generate(model, prompts(), max_new_tokens=5, temperature=1.0, top_p=0.0, eos_id=None,
                       generator=torch.Generator().manual_seed(0))
    assert nucleus == greedy


@pytest.mark.parametrize("settings", [{"temperature": math.nan}, {"temperature": -1.0}, {"top_p": math.nan},
                                      {"top_k": -1}])
def test_sampling_settings_that_mean_nothing_are_refused(model, settings):
    with pytest.raises(ValueError, match="need temperature >= 0"):
        generate(model, prompts(), max_new_tokens=2, **settings)
