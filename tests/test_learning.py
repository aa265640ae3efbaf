"""Learning per token: document masking of packed windows, auxiliary-loss-free expert balancing."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from blues_model import BluesConfig, BluesLM, RunOptions
from blues_model.attention import document_dense_mask, documents
from blues_model.config import EOT_ID
from blues_model.moe import MoE
from blues_train.data import tokenizer
from blues_train.io.errors import BluesError
from blues_train.serving.export import write_export
from blues_train.training import checkpoint

TEXTS = ["def add(a, b):\n    return a + b\n",
         "The river rose all night, and by morning the low fields were a lake.",
         "SELECT name, count(*) FROM users GROUP BY name ORDER BY 2 DESC;"]


def tiny(**overrides) -> BluesConfig:
    return BluesConfig.from_dict({**BluesConfig.preset("tiny").to_dict(), **overrides})


def document_model() -> BluesLM:
    torch.manual_seed(0)
    return BluesLM(tiny(), RunOptions(attention_mask="document")).eval()


def test_eot_id_is_the_tokenizers():
    assert EOT_ID == tokenizer.EOT_ID


def test_documents_and_positions_restart_after_each_eot():
    ids = torch.tensor([[5, 6, EOT_ID, 7, EOT_ID, EOT_ID, 8, 9]])
    doc, pos = documents(ids)
    assert doc.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_packed_window_equals_its_documents_one_by_one():
    """fp32 on the CPU: each document's logits and loss in a packed window are those of the
    document alone (its text and EOT), whatever precedes it."""
    model = document_model()
    docs = [tokenizer.encode(text) + [EOT_ID] for text in TEXTS]
    window = torch.tensor([sum(docs, [])])
    with torch.no_grad():
        packed = model(window).logits[0]
        alone = torch.cat([model(torch.tensor([doc])).logits[0] for doc in docs])
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
        inputs, labels = window[:, :-1], window[:, 1:]
        doc_losses = [model(torch.tensor([doc[:-1]]), labels=torch.tensor([doc[1:]])).loss for doc in docs]
        boundary = [torch.nn.functional.cross_entropy(alone[len(d) - 1 + sum(map(len, docs[:i]))][None],
                                                      torch.tensor([docs[i + 1][0]]))
                    for i, d in enumerate(docs[:-1])]  # an EOT's label: the next document's first token
        n = sum(len(d) - 1 for d in docs) + len(boundary)
        want = (sum(loss * (len(d) - 1) for loss, d in zip(doc_losses, docs)) + sum(boundary)) / n
        torch.testing.assert_close(model(inputs, labels=labels).loss, want, rtol=1e-5, atol=1e-6)


def test_causal_mask_attends_across_documents():
    docs = [tokenizer.encode(text) + [EOT_ID] for text in TEXTS[:2]]
    window = torch.tensor([sum(docs, [])])
    causal = BluesLM(tiny(), RunOptions(attention_mask="causal")).eval()
    document = document_model()
    causal.load_state_dict(document.state_dict())
    with torch.no_grad():
        first = len(docs[0])
        torch.testing.assert_close(causal(window).logits[:, :first], document(window).logits[:, :first])
        assert not torch.allclose(causal(window).logits[:, first:], document(window).logits[:, first:])


def test_single_document_is_unaffected_by_document_masking():
    ids = torch.tensor([tokenizer.encode(TEXTS[0] + TEXTS[1])] * 2)
    document = document_model()
    causal = BluesLM(tiny()).eval()
    causal.load_state_dict(document.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(document(ids).logits, causal(ids).logits)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # the mask is tested, not the kernel
def test_flex_block_mask_equals_dense_reference():
    """The CUDA kernel's mask (FlexAttention) against the CPU reference (SDPA, boolean mask)."""
    torch.manual_seed(0)
    ids = torch.tensor([[1, 2, EOT_ID, 3, 4, 5, EOT_ID, 6] * 4, [7] * 32])
    doc, _ = documents(ids)
    q, k, v = torch.randn(2, 4, 32, 16), torch.randn(2, 1, 32, 16), torch.randn(2, 1, 32, 16)
    block_mask = create_block_mask(lambda b, h, qi, ki: (doc[b, qi] == doc[b, ki]) & (ki <= qi), 2, None, 32, 32,
                                   device="cpu", BLOCK_SIZE=16)
    got = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=document_dense_mask(doc),
                                                            enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def max_over_mean_load(router, x) -> float:
    counts = torch.bincount(router(x)[1].flatten(), minlength=router.w_gate.shape[1])
    return (counts.max() / counts.float().mean()).item()


def test_expert_bias_drives_a_skewed_router_to_even_load():
    torch.manual_seed(0)
    router = MoE(tiny(n_experts=8, top_k=2)).router.eval()
    x = torch.randn(4096, 64)
    x[:, 0] = 1.0
    with torch.no_grad():
        router.w_gate.normal_(0.0, 0.05)
        router.w_gate[0, 0] = 1.0  # expert 0 favoured by every token
        before = max_over_mean_load(router, x)
        for _ in range(300):
            counts = torch.bincount(router(x)[1].flatten(), minlength=8)
            router.nudge_bias(counts / counts.sum(), rate=1e-2)
        after = max_over_mean_load(router, x)
    assert before > 3.5  # top-2 of 8: 4.0 when expert 0 is in every pair
    assert after <= 1.1, after


def test_expert_bias_changes_choice_not_weights():
    torch.manual_seed(0)
    router = MoE(tiny()).router.eval()
    with torch.no_grad():
        router.w_gate.normal_(0.0, 0.3)
        x = torch.randn(16, 64)
        router.expert_bias[3] = 100.0
        weights, ids, _, logits = router(x)
        assert (ids == 3).any(dim=1).all()
        torch.testing.assert_close(weights, logits.gather(1, ids).softmax(-1))
        torch.testing.assert_close(router.choose(x)[1], ids)


def test_expert_bias_is_saved_stays_fp32_and_absent_loads_as_zero():
    model = BluesLM(tiny())
    names = [name for name in model.state_dict() if name.endswith("router.expert_bias")]
    assert len(names) == len(model.config.moe_layers)
    model.blocks[1].ffn.router.expert_bias.fill_(0.25)
    old = {k: v for k, v in model.state_dict().items() if k not in names}  # weights saved before the bias
    model.to(torch.bfloat16)
    assert model.blocks[1].ffn.router.expert_bias.dtype == torch.float32
    model.load_state_dict(old)
    assert not model.blocks[1].ffn.router.expert_bias.any()


def test_export_refuses_a_trained_expert_bias(tmp_path):
    model = BluesLM(tiny())
    model.blocks[1].ffn.router.expert_bias[2] = 0.5
    with pytest.raises(BluesError, match="expert_bias"):
        write_export(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_resume_is_exact_with_document_masking_and_bias_balancing(mixture_dir, tmp_path):
    """A run with both options, resumed from its step-4 checkpoint, repeats steps 5-8 and ends
    with the same routing bias; the bias moved, and the checkpoint records the options."""
    from safetensors.torch import load_file
    from training_runs import assert_close, losses, one_rank

    options = ["--attention_mask", "document", "--router_balance", "both", "--router_bias_rate", "0.01"]
    one_rank(mixture_dir, tmp_path / "full", *options)
    one_rank(mixture_dir, tmp_path / "resumed", *options, "--resume",
             str(tmp_path / "full" / "checkpoints" / "step-000004"))
    assert_close(losses(tmp_path / "resumed"), losses(tmp_path / "full"), range(5, 9))
    final = [load_file(tmp_path / run / "checkpoints" / "step-000008" / "model.safetensors")
             for run in ("full", "resumed")]
    biases = [name for name in final[0] if name.endswith("router.expert_bias")]
    assert biases and all(final[0][name].abs().sum() > 0 for name in biases)
    for name in biases:
        torch.testing.assert_close(final[1][name], final[0][name], rtol=0, atol=0)
    meta = checkpoint.read_meta(tmp_path / "full" / "checkpoints" / "step-000008")
    assert (meta["attention_mask"], meta["router_balance"]) == ("document", "both")
