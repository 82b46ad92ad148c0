"""One edit rule for every unit set (a unit's distance from its mean code scaled), each edit's size ‖Δx‖, and its
collateral on other facts' prompts (never the fact's own)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kscope.facts import Fact, resolve_targets
from kscope.locate import conditions
from kscope.locate.attribution import attribution_patching, integrated_gradients, integrated_gradients_many
from kscope.locate.conditions import SetJob, _block_edit, _Block, measure_sets
from kscope.locate.delta_prob import DeltaProbConfig
from kscope.locate.edits import collateral_panel
from kscope.model.hooks import hooked
from kscope.model.prefix import PrefixRunner
from kscope.model.sites import Site, down_proj_weight
from kscope.units.base import FeatureUnits, NeuronUnits, enhance, suppress
from kscope.units.corpus import CorpusConfig, build_corpus, collect_activations
from kscope.units.decompositions import baseline_units
from kscope.units.means import fit_code_means
from kscope.units.provision import neuron_units
from kscope.units.training import TrainSAEConfig, drop_outliers
from tests.helpers import jumprelu_sae

TEXTS = ["the capital of france is paris and the capital of italy is rome", "people in spain speak spanish today",
         "the capital of germany is berlin . people in germany speak german", "the eiffel tower is in paris , in france",
         "the official language of italy is italian", "new york is a city in a country", "one two three . history and science",
         "when people in france speak french it is the official language", "rome is the capital city of italy",
         "madrid is a city in spain and the capital of spain"] * 3
OUTLIERS = TrainSAEConfig().outlier_factor


def _corpus(tmp_path) -> CorpusConfig:
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(f"{t} {i}" for i, t in enumerate(TEXTS)))  # distinct texts
    return CorpusConfig(generate=0, text_files=[str(p)], heldout_frac=0.2)


def _features(layer: int, kind: str, threshold: float) -> FeatureUnits:
    sae = jumprelu_sae(32, 64, f"blocks.{layer}.hook_{'mlp_out' if kind == 'mlp.out' else 'resid_post'}", seed=0)
    with torch.no_grad():
        sae.threshold.fill_(threshold)
    return FeatureUnits(Site(layer, kind), sae)


def test_every_unit_suppressed_leaves_the_site_at_its_mean_for_basis_pca_and_random(llama_lm, facts, tmp_path):
    """The basis is edited like PCA and random directions: every unit suppressed puts the site at its corpus mean, the
    same activations (and so the same log P) for all three; the mean codes are fitted on the baselines' tokens."""
    site = Site(1, "resid.post")
    ccfg = _corpus(tmp_path)
    train, _ = build_corpus(llama_lm, ccfg, None, None).split()
    acts = drop_outliers(collect_activations(llama_lm, [site], train, 256, ccfg.seq_len)[site].float(), OUTLIERS)[0]
    sets = [baseline_units(k, site, acts) for k in ("basis", "pca", "random")]
    feats, neurons = _features(1, "resid.post", 0.05), neuron_units(llama_lm, 1)
    fit_code_means(llama_lm, sets + [feats, neurons], 256, ccfg, OUTLIERS)
    basis, pca, rnd = sets
    assert torch.allclose(basis.code_mean, acts.mean(0), atol=1e-5)
    assert pca.code_mean.abs().max() < 1e-4 and rnd.code_mean.abs().max() < 1e-4  # their codes are centred already
    assert torch.allclose(feats.code_mean, feats.encode(acts).mean(0), atol=1e-5)
    x = torch.randn(2, 3, acts.shape[1]) * 3
    for units in sets:
        sizes: dict = {}
        out = _block_edit([_Block(0, 0, units, torch.zeros(2, units.n_units), "error")], sizes)(x)
        assert torch.allclose(out, acts.mean(0).expand_as(x), atol=1e-4)
        assert sizes[0] == pytest.approx((x - acts.mean(0)).norm(dim=-1).mean(-1), abs=1e-4)  # ‖Δx‖ per row
    fact = resolve_targets(facts, llama_lm.tokenizer)[0]
    cfg = DeltaProbConfig(ks=[1], random_draws=0, matched_draws=0)
    got = measure_sets(llama_lm, fact, [SetJob(u, [0], controls=False) for u in sets], cfg)
    assert got[0].all.log == pytest.approx(got[1].all.log, abs=1e-4) == pytest.approx(got[2].all.log, abs=1e-4)
    assert got[0].all.dx == pytest.approx(got[1].all.dx, abs=1e-4) and got[0].all.dx > 0
    assert {g.ablated_to for g in got} == {"mean"}
    basis.code_mean = None  # unfitted: the old rule, the site zeroed
    zero = measure_sets(llama_lm, fact, [SetJob(basis, [0], controls=False)], cfg)[0]
    assert zero.ablated_to == "zero" and zero.all.log != pytest.approx(got[0].all.log, abs=1e-4)


def test_the_unit_ops_follow_the_same_rule():
    c = torch.tensor([1.0, -2.0, 0.5])
    u = torch.tensor([[3.0, 0.0, 0.5]])
    assert suppress([0, 1], c)(u).tolist() == [[1.0, -2.0, 0.5]]
    assert enhance([0, 1], 2.0, c)(u).tolist() == [[5.0, 2.0, 0.5]]
    assert suppress([0])(u).tolist() == [[0.0, 0.0, 0.5]]  # no centre: zeroed, as before
    units = NeuronUnits(Site(0, "mlp.neurons"), 3)
    units.code_mean = c
    f = torch.tensor([[0.0, 2.0, 1.0]])
    assert units.scaled(u, f).tolist() == [[1.0, 2.0, 0.5]]
    assert units.op("suppress", [0])(u).tolist() == [[1.0, 0.0, 0.5]]


def test_edit_size_is_recorded_and_zero_for_units_that_sit_at_their_mean(llama_lm, facts):
    """‖Δx‖ of suppressing silent features whose mean code is 0 is exactly 0 (the effect too, up to the splice's
    rounding; no effect per size); a neuron edit's size is measured in what the MLP writes (through the down-projection), as by hand."""
    fact = resolve_targets(facts, llama_lm.tokenizer)[0]
    feats = _features(1, "resid.post", 0.03)
    feats.code_mean = torch.zeros(feats.n_units)
    acts = conditions.last_token_activations(llama_lm, [feats], fact.prompts)[0]
    silent = [int(i) for i in np.flatnonzero((acts == 0).all(0))[:3]]
    neurons = neuron_units(llama_lm, 1)
    neurons.code_mean = torch.linspace(-0.1, 0.1, neurons.n_units)
    cfg = DeltaProbConfig(ks=[1, 3], random_draws=1, matched_draws=0)
    quiet, loud = measure_sets(llama_lm, fact, [SetJob(feats, silent), SetJob(neurons, [0, 1, 2, 3])], cfg)
    for op in ("suppress", "enhance"):
        assert quiet.top[op][3].dx == 0.0 and quiet.top[op][3].per_dx is None
        assert quiet.top[op][3].log == pytest.approx(0.0, abs=1e-5)  # the SAE splice's rounding only
    assert loud.random["suppress"][3].dx > 0 and loud.all.dx > loud.top["suppress"][3].dx > 0
    W = down_proj_weight(llama_lm.model, 1).float()
    want = []
    for prompt in fact.prompts:
        with torch.no_grad(), hooked(llama_lm.model, capture=[neurons.site]) as cap:
            llama_lm.model(input_ids=torch.tensor([llama_lm.tokenizer(prompt).input_ids]))
        a = cap[neurons.site][0, -1].float()
        d = torch.zeros_like(a)
        d[:3] = neurons.code_mean[:3] - a[:3]
        want.append(float((W @ d).norm()))
    e = loud.top["suppress"][3]
    assert e.dx == pytest.approx(np.mean(want), rel=1e-4)
    assert e.per_dx == pytest.approx(e.log / e.dx)


def _pool(lm):
    facts = [Fact("france", "capital", "paris", ["the capital of france is", "the capital city of france is"]),
             Fact("germany", "capital", "berlin", ["the capital of germany is"]),
             Fact("italy", "capital", "rome", ["the capital of italy is"]),
             Fact("spain", "language", "spanish", ["people in spain speak", "the official language of spain is"]),
             Fact("france", "language", "french", ["people in france speak"]),
             Fact("italy", "language", "italian", ["people in italy speak"]),
             Fact("eiffel tower", "located", "paris", ["the eiffel tower is in"]),
             Fact("new york", "located", "new york", ["new york is a city in"])]
    return resolve_targets(facts, lm.tokenizer)


def test_the_collateral_panel_spans_other_relations_and_never_holds_the_fact(llama_lm):
    pool = _pool(llama_lm)
    fact = pool[0]
    panel = collateral_panel(fact, pool, 3)
    assert len(panel) == 3 and len({f.relation for f in panel}) == 2  # two other relations: round-robin, then repeats
    for f in panel:
        assert f.relation != fact.relation and f.subject != fact.subject and f.object != fact.object and len(f.prompts) == 1
    assert [f.uid for f in collateral_panel(fact, pool[::-1], 3)] == [f.uid for f in panel]  # order does not matter
    assert [f.uid for f in collateral_panel(fact, pool, 3, seed=1)] != [f.uid for f in panel] or len(pool) < 6
    assert collateral_panel(fact, pool, 0) == [] and len(collateral_panel(fact, pool, 99)) == 3  # 3 candidates in all


def test_collateral_is_measured_on_other_facts_prompts_only(llama_lm, monkeypatch):
    """A spy on the condition passes: the fact's own prompts once, then each panel fact's one prompt, disjoint from
    the fact's, with the top-k rows only; the collateral equals the same edit measured on the panel fact itself."""
    pool = _pool(llama_lm)
    fact = pool[0]
    panel = collateral_panel(fact, pool, 2)
    seen = []
    real = conditions.condition_logps

    def spy(lm, f, jobs, *a, **k):
        seen.append((f.uid, list(f.prompts), [fac.shape[0] for _, fac, _ in jobs]))
        return real(lm, f, jobs, *a, **k)

    monkeypatch.setattr(conditions, "condition_logps", spy)
    units = neuron_units(llama_lm, 1)
    cfg = DeltaProbConfig(ks=[1, 3], random_draws=1, matched_draws=1)
    (eff,) = measure_sets(llama_lm, fact, [SetJob(units, [5, 1, 7], key="n")], cfg, panel=panel)
    assert seen[0][:2] == (fact.uid, fact.prompts)
    assert [s[0] for s in seen[1:]] == [f.uid for f in panel]
    for uid, prompts, rows in seen[1:]:
        assert uid != fact.uid and not set(prompts) & set(fact.prompts) and len(prompts) == 1
        assert rows == [4]  # 2 ops x 2 ks: top-k rows only, no random, matched or every-unit rows
    assert eff.random["suppress"][3].collateral is None and eff.all.collateral is None
    monkeypatch.setattr(conditions, "condition_logps", real)
    alone = [measure_sets(llama_lm, f, [SetJob(units, [5, 1, 7], controls=False)], DeltaProbConfig(ks=[1, 3], random_draws=0,
                                                                                                   matched_draws=0))[0]
             for f in panel]
    for op in ("suppress", "enhance"):
        for k in (1, 3):
            assert eff.top[op][k].collateral == pytest.approx(np.mean([a.top[op][k].log for a in alone]), abs=1e-6)
    with pytest.raises(Exception, match="shares its fact"):
        measure_sets(llama_lm, fact, [SetJob(units, [5, 1, 7])], cfg, panel=[fact])


def test_ig_and_atp_start_from_the_centre(lm):
    """With mean codes set, IG's path starts at the centre: the batched IG equals the plain one, is complete
    (sum = f(x) - f(centre)), and AtP equals IG with one step."""
    runner = PrefixRunner(lm.model, lm.tokenizer("the capital of france is").input_ids)
    target = lm.tokenizer(" paris", add_special_tokens=False).input_ids[0]
    sets = [neuron_units(lm, 1), NeuronUnits(Site(2, "mlp.out"), 32)]
    g = torch.Generator().manual_seed(0)
    for u in sets:
        u.code_mean = torch.randn(u.n_units, generator=g) * 0.3
    many = integrated_gradients_many(runner, sets, target, steps=8, max_rows=12)
    for u, (s, f, f0) in zip(sets, many):
        s1, f1, f01 = integrated_gradients(runner, u, target, steps=8, batch_size=5)
        assert torch.allclose(s, s1, atol=1e-6, rtol=1e-4) and abs(f0 - f01) < 1e-6
    s, f, f0 = integrated_gradients(runner, sets[0], target, steps=200, batch_size=67)
    site_zero = NeuronUnits(sets[0].site, sets[0].n_units)
    _, _, f_zero = integrated_gradients(runner, site_zero, target, steps=1)
    assert abs(f0 - f_zero) > 1e-6  # the baseline moved
    assert abs(float(s.sum()) - (f - f0)) < 0.02 * abs(f - f0) + 1e-6
    ig1 = integrated_gradients_many(runner, sets, target, steps=1)
    atp = attribution_patching(lm.model, [lm.tokenizer("the capital of france is").input_ids], sets, target)
    for (a, _), (s1, _, _) in zip(atp, ig1):
        assert torch.allclose(a[0], s1, atol=1e-6, rtol=1e-4)
