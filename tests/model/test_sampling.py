import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from kscope.model.sampling import draw, sample, warped_probs


@pytest.mark.parametrize("vocab,top_k,top_p", [(40, 50, 0.95), (500, 50, 0.95), (500, 10, 0.5), (500, 50, 1.0)])
def test_warped_probs_are_generates_top_k_then_top_p(vocab, top_k, top_p):
    """The distribution sampled from equals transformers' own warpers' (top-k, then top-p over the renormalised rest)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, vocab, generator=g) * torch.linspace(0.5, 6, 64)[:, None]  # flat to peaked rows
    ref = TopPLogitsWarper(top_p)(None, TopKLogitsWarper(top_k)(None, logits.clone())).softmax(-1)
    p, idx = warped_probs(logits, top_k, top_p)
    ours = torch.zeros_like(ref).scatter(1, idx, p)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_draw_follows_the_distribution():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).expand(20000, 4)
    idx = torch.tensor([[7, 3, 9, 1]]).expand(20000, 4)
    got = draw(p, idx, torch.Generator().manual_seed(1))
    freq = torch.stack([(got == t).float().mean() for t in (7, 3, 9, 1)])
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.015)


def test_greedy_sampling_equals_generate_and_a_seed_fixes_the_text(lm):
    """top_k=1 makes sampling greedy: the KV-cache loop must then reproduce generate token for token."""
    ids = torch.tensor([lm.tokenizer("the capital of").input_ids] * 3)
    ref = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=7, pad_token_id=0)
    got = sample(lm.model, ids, 7, torch.Generator().manual_seed(0), top_k=1)
    assert torch.equal(got, ref)
    a = sample(lm.model, ids, 7, torch.Generator().manual_seed(5), top_k=20, top_p=0.9)
    b = sample(lm.model, ids, 7, torch.Generator().manual_seed(5), top_k=20, top_p=0.9)
    c = sample(lm.model, ids, 7, torch.Generator().manual_seed(6), top_k=20, top_p=0.9)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_rows_stop_at_eos(llama_lm):
    ids = torch.tensor([llama_lm.tokenizer("the capital of").input_ids] * 4)
    first = sample(llama_lm.model, ids, 1, torch.Generator().manual_seed(0), top_k=1)[0, -1].item()
    out = sample(llama_lm.model, ids, 6, torch.Generator().manual_seed(0), top_k=1, eos=first, pad=0)
    assert out.shape[1] == ids.shape[1] + 1  # every row sampled eos at once: sampling stopped
    assert (out[:, -1] == first).all()
