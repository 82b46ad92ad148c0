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


def _whole(lm, prompt="the capital of france is", answer=" paris . it", start=0):
    from kscope.locate.objectives import Objective

    runner = PrefixRunner(lm.model, lm.tokenizer(prompt).input_ids)
    return runner, Objective(tuple(lm.tokenizer(answer, add_special_tokens=False).input_ids), start, "logprob")


def test_whole_answer_objective_value_is_teacher_forced_logprob(lm):
    from kscope.model.readout import answer_logprobs

    runner, obj = _whole(lm, start=1)
    lp, _ = answer_logprobs(lm.model, lm.tokenizer, ["the capital of france is"], obj.tokens, obj.start)
    ids = lm.tokenizer("the capital of france is").input_ids
    full = lm.model(torch.tensor([ids + list(obj.tokens)])).logits[0].log_softmax(-1)
    ref = sum(float(full[len(ids) - 1 + t, obj.tokens[t]]) for t in range(1, len(obj.tokens)))
    assert abs(float(lp[0]) - ref) < 1e-4
    assert abs(float(obj.value(runner.logits(1, obj.continuation))[0]) - ref) < 1e-4


@pytest.mark.parametrize("kind,start", [("prob", 0), ("logprob", 0), ("logprob", 2)])
def test_objective_closed_form_gradient_matches_autograd(llama_lm, kind, start):
    from kscope.locate.attribution import head_logits, plain_head
    from kscope.locate.objectives import Objective

    head = plain_head(llama_lm.model)
    torch.manual_seed(0)
    tokens = (7,) if kind == "prob" else (7, 3, 9, 4)
    obj = Objective(tokens, start, kind)
    h = torch.randn(5, len(tokens), head.in_features, requires_grad=True)
    value, dh = obj.value_grad(head, h, head_logits, chunk=2)
    ref = obj.value(head(h))
    (g,) = torch.autograd.grad(ref.sum(), h)
    assert torch.allclose(value, ref.detach(), atol=1e-5)
    assert torch.allclose(dh, g, atol=1e-6)


def test_whole_answer_ig_many_equals_plain_and_is_complete(lm):
    from kscope.locate.attribution import integrated_gradients_many

    runner, obj = _whole(lm, start=1)
    sets = [NeuronUnits(Site(layer, kind), site_dim(lm.model, Site(layer, kind))) for layer in (2, 0) for kind in ("mlp.neurons", "mlp.out")]
    many = integrated_gradients_many(runner, sets, obj, steps=8, max_rows=20)
    for u, (s, f, f0) in zip(sets, many):
        s1, f1, f01 = integrated_gradients(runner, u, obj, steps=8, batch_size=5)
        assert torch.allclose(s, s1, atol=1e-5, rtol=1e-4)
        assert abs(f - f1) < 1e-5 and abs(f0 - f01) < 1e-5
    u = sets[0]
    s200, f, f0 = integrated_gradients(runner, u, obj, steps=200, batch_size=67)
    assert abs(float(s200.sum()) - (f - f0)) < 0.02 * abs(f - f0) + 1e-4


@pytest.mark.parametrize("whole", [False, True])
def test_atp_equals_ig_with_one_step_and_autograd_grad_times_activation(lm, whole):
    from kscope.locate.attribution import attribution_patching, integrated_gradients_many

    runner, obj = _whole(lm, start=1) if whole else (PrefixRunner(lm.model, lm.tokenizer("the capital of france is").input_ids),
                                                     lm.tokenizer(" paris", add_special_tokens=False).input_ids[0])
    sets = [NeuronUnits(Site(layer, kind), site_dim(lm.model, Site(layer, kind))) for layer in (0, 2) for kind in ("mlp.neurons", "mlp.out")]
    # One right-padded batch: a shorter and a longer prompt around the one checked against IG and autograd.
    others = [lm.tokenizer(p).input_ids for p in ("paris is in", "the capital of france is a city whose name is")]
    batch = attribution_patching(lm.model, [others[0], lm.tokenizer("the capital of france is").input_ids, others[1]], sets, obj)
    atp = [(sc[1], float(v[1])) for sc, v in batch]
    ig1 = integrated_gradients_many(runner, sets, obj, steps=1)
    for (a, f), (s, f1, _) in zip(atp, ig1):
        assert torch.allclose(a, s, atol=1e-6, rtol=1e-4) and abs(f - f1) < 1e-5
    alone = attribution_patching(lm.model, [others[1]], sets, obj)
    for (sb, vb), (sa, va) in zip(batch, alone):  # padding after a row changes nothing in it
        assert torch.allclose(sb[2], sa[0], atol=1e-6, rtol=1e-4) and abs(float(vb[2] - va[0])) < 1e-5
    # Plain autograd on one full forward: grad of the objective w.r.t. each site's activation, times it, summed
    # over the positions from the prompt's last token on.
    from kscope.locate.objectives import Objective

    o = obj if isinstance(obj, Objective) else Objective.first_token(obj)
    ids = lm.tokenizer("the capital of france is").input_ids
    full = torch.tensor([ids + o.continuation])
    acts = {}

    def grab(site):
        def edit(x):
            y = x.detach().requires_grad_(True)
            acts[site] = y
            return y
        return edit

    from kscope.model.hooks import hooked

    for (a, _), u in zip(atp, sets):
        with torch.enable_grad(), hooked(lm.model, {u.site: grab(u.site)}):
            logits = lm.model(full).logits[:, len(ids) - 1 :]
            (g,) = torch.autograd.grad(o.value(logits).sum(), acts[u.site])
        ref = (g[0, len(ids) - 1 :] * acts[u.site][0, len(ids) - 1 :]).sum(0)
        assert torch.allclose(a, ref.detach(), atol=1e-6, rtol=1e-4)


def test_atp_is_exact_on_a_linear_toy():
    """f linear in the units: AtP (one gradient at the input, times the input) is the exact attribution, as is IG."""
    from kscope.locate.attribution import riemann_ig

    torch.manual_seed(0)
    u, w = torch.rand(6), torch.randn(6)
    f = lambda x: x @ w + 0.5  # noqa: E731
    one, _ = riemann_ig(u, f, steps=1, batch_size=2)
    many, _ = riemann_ig(u, f, steps=50, batch_size=51)
    assert torch.allclose(one, u * w, atol=1e-6) and torch.allclose(many, one, atol=1e-6)


def test_midpoint_step_is_exact_on_a_quadratic_where_the_endpoint_is_not():
    """f quadratic: its gradient is linear along the path, so one midpoint step (atp-mid) is IG exactly; AtP is not."""
    from kscope.locate.attribution import riemann_ig

    torch.manual_seed(0)
    u, A, w = torch.rand(6), torch.randn(6, 6), torch.randn(6)
    f = lambda x: 0.5 * ((x @ A) * x).sum(-1) + x @ w  # noqa: E731
    exact, _ = riemann_ig(u, f, steps=400, batch_size=401)
    mid, _ = riemann_ig(u, f, steps=1, batch_size=2, rule="midpoint")
    end, _ = riemann_ig(u, f, steps=1, batch_size=2)
    assert torch.allclose(mid, exact, atol=1e-3) and not torch.allclose(end, exact, atol=1e-2)
    assert abs(float(mid.sum()) - float(f(u[None]) - f(torch.zeros(1, 6)))) < 1e-4  # complete


def _planted(llama_lm):
    """Neuron j of layer 1 alone writes the answer: its output weights are the answer's unembedding, scaled up."""
    import copy

    from kscope.model.hooks import site_activations
    from kscope.model.sites import down_proj_weight

    lm = copy.deepcopy(llama_lm)
    ids = lm.tokenizer("the capital of france is").input_ids
    target = lm.tokenizer(" rome", add_special_tokens=False).input_ids[0]
    a = site_activations(lm.model, [Site(1, "mlp.neurons")], torch.tensor([ids]))[Site(1, "mlp.neurons")][0, -1]
    j = int(a.argmax())
    W = down_proj_weight(lm.model, 1)
    u = lm.model.lm_head.weight[target].clone()
    W[:, j] = 40.0 * u / u.norm() / float(a[j])
    lm.model.lm_head.weight[target] *= 30  # random init logits are tiny; let the answer's direction count
    return lm, ids, target, j


@pytest.mark.parametrize("method", ["ig", "atp", "atp-mid", "atp-ig"])
def test_every_method_ranks_a_planted_unit_first(llama_lm, method):
    from kscope.locate.attribution import prompt_scores

    lm, ids, target, j = _planted(llama_lm)
    sets = [NeuronUnits(Site(L, "mlp.neurons"), 64) for L in range(3)]
    scores, p = prompt_scores(lm, ["the capital of france is"], target, sets, steps=8, method=method, shortlist=5)
    assert p[0] > 0.5  # the planted neuron carries the answer: without it the answer is unlikely
    from kscope.model.readout import answer_probs
    from kscope.units.base import suppress

    p0, _ = answer_probs(lm.model, lm.tokenizer, ["the capital of france is"], [target], {sets[1].site: sets[1].edit_fn(suppress([j]))})
    assert float(p0[0]) < 0.5 * p[0]
    assert int(scores[1][0].argmax()) == j
    assert float(scores[1][0, j]) > max(float(s[0].max()) for L, s in enumerate(scores) if L != 1)
