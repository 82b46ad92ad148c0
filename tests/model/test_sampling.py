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


def test_the_preallocated_cache_samples_the_same_text_as_the_growing_one(llama_lm, monkeypatch):
    """Keys and values written in place into one buffer (no per-step concatenation) give the same tokens, bit for bit,
    as transformers' own cache; the buffer really is used, and a model it cannot serve gets its own cache."""
    from kscope.model import sampling

    ids = torch.tensor([llama_lm.tokenizer("the capital of").input_ids] * 5)
    cache = sampling.preallocated_cache(llama_lm.model, ids.shape[1] + 9)
    assert cache is not None and all(isinstance(layer, sampling._BufferLayer) for layer in cache.layers)
    ours = sample(llama_lm.model, ids, 9, torch.Generator().manual_seed(3), top_k=20, top_p=0.9)
    monkeypatch.setattr(sampling, "preallocated_cache", lambda model, capacity: None)
    plain = sample(llama_lm.model, ids, 9, torch.Generator().manual_seed(3), top_k=20, top_p=0.9)
    assert torch.equal(ours, plain)


def test_a_buffer_layer_past_its_capacity_grows_as_the_plain_layer():
    from transformers.cache_utils import DynamicLayer

    from kscope.model.sampling import _BufferLayer

    layer = _BufferLayer(capacity=3)
    steps = [torch.randn(2, 1, n, 4) for n in (2, 1, 2)]
    for s in steps:
        k, v = layer.update(s, -s)
    assert type(layer) is DynamicLayer
    assert torch.equal(k, torch.cat(steps, -2)) and torch.equal(v, -torch.cat(steps, -2))


def test_copies_run_each_prompt_once_and_draw_as_repeated_rows(llama_lm):
    """``copies=n`` samples each prompt n times from one prefix run: the same draws as the prompts repeated n times."""
    tok = llama_lm.tokenizer
    ids = torch.tensor([tok("the capital of").input_ids, tok("the city of").input_ids])
    ours = sample(llama_lm.model, ids, 6, torch.Generator().manual_seed(2), top_k=None, top_p=1.0, copies=4)
    ref = sample(llama_lm.model, ids.repeat_interleave(4, 0), 6, torch.Generator().manual_seed(2), top_k=None, top_p=1.0)
    assert ours.shape == (8, ids.shape[1] + 6)
    assert torch.equal(ours, ref)
    assert len({tuple(r) for r in ours[:4, ids.shape[1]:].tolist()}) > 1  # the copies are sampled, not copied
