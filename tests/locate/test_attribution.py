import pytest
import torch

from kscope.locate.attribution import coarse_select, integrated_gradients, rank_units, refine_select, riemann_ig
from kscope.model.prefix import PrefixRunner
from kscope.model.sites import Site, site_dim
from kscope.units.base import NeuronUnits



def test_ig_completeness_on_tiny_model(lm):
    """sum(IG) ~= f(x) - f(baseline) with enough steps (Riemann error shrinks)."""
    site = Site(1, "mlp.neurons")
    units = NeuronUnits(site, site_dim(lm.model, site))
    runner = PrefixRunner(lm.model, lm.tokenizer("the capital of france is").input_ids)
    target = lm.tokenizer(" paris", add_special_tokens=False).input_ids[0]
    s20, p, p0 = integrated_gradients(runner, units, target, steps=20, batch_size=7)
    s200, _, _ = integrated_gradients(runner, units, target, steps=200, batch_size=64)
    gap = p - p0
    assert abs(gap) > 1e-5
    assert abs(float(s200.sum()) - gap) <= abs(float(s20.sum()) - gap) + 1e-7
    assert abs(float(s200.sum()) - gap) < 0.02 * abs(gap) + 1e-6


def test_riemann_ig_exact_on_linear_toy():
    """f linear in the units: IG_i = u_i * w_i exactly, and sum = f(u) - f(0)."""
    torch.manual_seed(0)
    u, w = torch.rand(6), torch.randn(6)
    f = lambda x: x @ w + 0.5  # noqa: E731
    scores, f0 = riemann_ig(u, f, steps=7, batch_size=3)
    assert torch.allclose(scores, u * w, atol=1e-6)
    assert abs(f0 - 0.5) < 1e-6
    assert abs(float(scores.sum()) - (float(f(u[None])[0]) - f0)) < 1e-5


def test_riemann_ig_converges_on_nonlinear_toy():
    u = torch.tensor([1.0, 2.0])
    f = lambda x: (x**2).sum(-1)  # noqa: E731  exact IG: u_i^2
    coarse, _ = riemann_ig(u, f, steps=4, batch_size=2)
    fine, _ = riemann_ig(u, f, steps=400, batch_size=64)
    assert (fine - u**2).abs().max() < (coarse - u**2).abs().max()
    assert torch.allclose(fine, u**2, atol=0.03)


def test_selection_rules():
    scores = torch.tensor([[1.0, 0.5, 0.1, -1.0], [0.8, 0.05, 0.9, 0.0], [1.0, 0.3, 0.0, 0.0]])
    sel = coarse_select(scores, 0.2)
    assert sel.tolist() == [[True, True, False, False], [True, False, True, False], [True, True, False, False]]
    assert refine_select(sel, 0.6) == [0, 1]
    assert refine_select(sel, 1.0) == [0]
    assert rank_units(scores, [1], 3) == [1, 0, 2]


def test_many_unit_sets_in_one_batch_equal_one_at_a_time(lm):
    runner = PrefixRunner(lm.model, lm.tokenizer("the capital of france is").input_ids)
    target = lm.tokenizer(" paris", add_special_tokens=False).input_ids[0]
    sets = [NeuronUnits(Site(layer, kind), site_dim(lm.model, Site(layer, kind)))
            for layer in range(3) for kind in ("mlp.neurons", "mlp.out")]
    from kscope.locate.attribution import integrated_gradients_many

    many = integrated_gradients_many(runner, sets, target, steps=8, max_rows=20)  # forces several chunks
    for u, (s, p, p0) in zip(sets, many):
        s1, p1, p01 = integrated_gradients(runner, u, target, steps=8, batch_size=9)
        assert torch.allclose(s, s1, atol=1e-6)
        assert abs(p - p1) < 1e-6 and abs(p0 - p01) < 1e-6


def test_answer_prob_grad_matches_autograd(lm):
    from kscope.locate.attribution import answer_prob_grad, plain_head

    head = plain_head(lm.model)
    assert head is not None
    torch.manual_seed(0)
    h = torch.randn(5, head.in_features, requires_grad=True)
    prob, dh = answer_prob_grad(head, h, 7)
    ref = head(h).softmax(-1)[:, 7]
    (g,) = torch.autograd.grad(ref.sum(), h)
    assert torch.allclose(prob, ref.detach(), atol=1e-7)
    assert torch.allclose(dh, g, atol=1e-7)


def _scaled_llama():
    """A tiny LLaMA whose logits are scaled after the head (like soft-capping): no plain head."""
    from tests.helpers import tiny_llama
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):
        def forward(self, input_ids=None, cache=None, **kw):
            out = super().forward(input_ids=input_ids, cache=cache, **kw)
            out.logits = out.logits * 2
            return out

    base = tiny_llama()
    model = Scaled(base.config)
    model.load_state_dict(base.state_dict())
    return model


def test_plain_head_detects_scaled_logits(llama_lm):
    from kscope.locate.attribution import plain_head

    assert plain_head(llama_lm.model) is llama_lm.model.lm_head
    assert plain_head(_scaled_llama()) is None


@pytest.mark.parametrize("scaled", [False, True])
def test_many_equals_one_at_a_time_with_and_without_plain_head(llama_lm, scaled):
    from kscope.locate.attribution import integrated_gradients_many

    model = _scaled_llama() if scaled else llama_lm.model
    runner = PrefixRunner(model, llama_lm.tokenizer("the capital of france is").input_ids)
    target = llama_lm.tokenizer(" paris", add_special_tokens=False).input_ids[0]
    sets = [NeuronUnits(Site(layer, "mlp.neurons"), 64) for layer in (2, 0, 1, 0)]  # unsorted, repeated layer
    many = integrated_gradients_many(runner, sets, target, steps=6)
    for u, (s, p, p0) in zip(sets, many):
        s1, p1, p01 = integrated_gradients(runner, u, target, steps=6, batch_size=4)
        assert torch.allclose(s, s1, atol=1e-6)
        assert abs(p - p1) < 1e-6 and abs(p0 - p01) < 1e-6


@pytest.mark.parametrize("batched", [False, True])
def test_matches_knowledge_neurons_library_exactly(batched):
    """Same site (GPT-2 c_fc output) and Riemann points: kscope's IG, one layer at a time or all layers
    in one growing batch, equals the EleutherAI library's."""
    kn_mod = pytest.importorskip("knowledge_neurons")
    from tests.helpers import tiny_gpt2, word_tokenizer

    from kscope.locate.attribution import integrated_gradients_many

    model, tok = tiny_gpt2().eval(), word_tokenizer()
    kn = kn_mod.KnowledgeNeurons(model, tok, model_type="gpt2", device="cpu")
    prompt = "the capital of france is"
    ref = kn.get_scores(prompt, " paris", batch_size=10, steps=20, pbar=False).detach()
    target = tok(" paris", add_special_tokens=False).input_ids[0]
    runner = PrefixRunner(model, tok(prompt).input_ids)
    sets = [NeuronUnits(Site(layer, "mlp.pre"), 128) for layer in range(3)]
    if batched:
        ours = torch.stack([s for s, _, _ in integrated_gradients_many(runner, sets, target, 20, "linspace")])
    else:
        ours = torch.stack([integrated_gradients(runner, u, target, 20, 10, "linspace")[0] for u in sets])
    assert torch.allclose(ours, ref, atol=1e-8, rtol=1e-4)
