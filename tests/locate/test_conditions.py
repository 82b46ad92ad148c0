"""The shared condition path of compare and the sweep: every row of the grown, prefix-shared passes equals its own
plain forward; matched random units are active and close in contribution norm; reconstruction-mode effects are
measured against the reconstruction alone."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from kscope.facts import resolve_targets
from kscope.locate.conditions import SetJob, condition_logps, factor_rows, measure_sets
from kscope.locate.matching import MATCH_POOL, contribution_norms, matched_units
from kscope.locate.delta_prob import DeltaProbConfig
from kscope.model.readout import fact_probs, last_token_activations
from kscope.model.sites import Site
from kscope.units.base import FeatureUnits
from kscope.units.decompositions import BasisUnits
from kscope.units.provision import neuron_units
from tests.helpers import jumprelu_sae


def _features(lm, layer: int, kind: str = "mlp.out", threshold: float = 0.05, seed: int = 0) -> FeatureUnits:
    sae = jumprelu_sae(32, 64, f"blocks.{layer}.hook_{'mlp_out' if kind == 'mlp.out' else 'resid_post'}", seed=seed)
    with torch.no_grad():
        sae.threshold.fill_(threshold)
    return FeatureUnits(Site(layer, kind), sae)


def _reference(lm, fact, units, factors, mode, positions):
    """log P per row from one plain forward per row (fact_probs), the edit built from ``Units`` directly."""
    out = []
    for row in factors:
        if mode == "error":
            fn = units.edit_fn(lambda u, r=row: u * r.to(u))
        else:
            fn = lambda x, r=row: units.decode(units.encode(x) * r.to(x)).to(x.dtype)  # noqa: E731
        p, _ = fact_probs(lm.model, lm.tokenizer, fact, edits={units.site: fn}, positions=positions)
        out.append(p.double().log().numpy())
    return np.stack(out)


@pytest.mark.parametrize("positions", ["last", "all"])
def test_every_row_equals_its_own_forward(lm, facts, positions):
    fact = resolve_targets(facts, lm.tokenizer)[0]
    sets = [(neuron_units(lm, 1), "error"), (_features(lm, 0), "error"), (_features(lm, 2, "resid.post"), "reconstruction"),
            (BasisUnits(Site(1, "resid.post"), 32), "error")]
    jobs = [(u, factor_rows(u.n_units, [("suppress", [0, 3]), ("enhance", [1]), ("keep", []), ("suppress", range(u.n_units))]), m)
            for u, m in sets]
    clean, got, _ = condition_logps(lm, fact, jobs, positions, max_rows=9)  # small passes: the sets split across them
    p0, _ = fact_probs(lm.model, lm.tokenizer, fact)
    assert clean == pytest.approx(p0.double().log().numpy(), abs=1e-5)
    for (units, factors, mode), lp in zip(jobs, got):
        assert lp == pytest.approx(_reference(lm, fact, units, factors, mode, positions), abs=2e-5)
    assert not np.allclose(got[0][0], clean)  # the edits do something


def test_whole_answer_rows_equal_their_own_forward(llama_lm, facts):
    fact = resolve_targets(facts, llama_lm.tokenizer)[0]
    tok = llama_lm.tokenizer
    fact.target_tokens = [fact.target_id, tok(" is", add_special_tokens=False).input_ids[0]]
    units = neuron_units(llama_lm, 1)
    factors = factor_rows(units.n_units, [("suppress", [0, 1, 2]), ("enhance", [5])])
    _, (lp,), _ = condition_logps(llama_lm, fact, [(units, factors, "error")])
    assert lp == pytest.approx(_reference(llama_lm, fact, units, factors, "error", "last"), abs=2e-5)


def test_matched_units_take_the_nearest_active_norms():
    norms = np.array([8.0, 0.0, 7.5, 0.0, 1.0, 8.2, 0.9, 0.0, 7.9, 1.1, 0.0, 6.0])
    rng = random.Random(0)
    for _ in range(50):
        got = matched_units([0, 4], norms, rng, pool=2)
        assert got[0] in (5, 8) and got[1] in (6, 9)  # the two active units nearest 8.0 and 1.0, never a top unit
    got = matched_units([0, 4], np.array([8.0, 0.0, 0.0, 3.0, 1.0]), rng)
    assert got[0] == 3 and got[1] in (1, 2)  # a silent unit only once no active one is left


def test_matched_random_units_are_active_and_close_to_the_top_units(llama_lm, facts):
    """On a tiny model with a sparse SAE: matched units fire at the answer-reading position, with norms near the top
    units'; most uniform draws do not fire."""
    fact = resolve_targets(facts, llama_lm.tokenizer)[0]
    units = _features(llama_lm, 1, "resid.post", threshold=0.01)
    acts = last_token_activations(llama_lm, [units], fact.prompts)[0]
    norms = contribution_norms(acts, units)
    active = np.flatnonzero(norms > 0)
    assert 10 <= len(active) <= 32  # sparse: most of the 64 features are silent
    top = [int(i) for i in np.argsort(-norms)[:3]]
    rng = random.Random(1)
    for _ in range(20):
        got = matched_units(top, norms, rng)
        assert all(norms[g] > 0 for g in got)
        for j, (t, g) in enumerate(zip(top, got)):  # among the MATCH_POOL active units nearest t in log norm not yet taken
            gaps = sorted(abs(np.log(norms[i] / norms[t])) for i in active if i not in top + got[:j])
            assert abs(np.log(norms[g] / norms[t])) <= gaps[MATCH_POOL - 1] + 1e-12
    cfg = DeltaProbConfig(ks=[1, 3], random_draws=2, matched_draws=2)
    (eff,) = measure_sets(llama_lm, fact, [SetJob(units, top)], cfg)
    assert eff.n_active == pytest.approx(float((acts != 0).sum(-1).float().mean()))
    assert 0.3 < eff.matched_norm < 1.0  # the nearest active units to the strongest ones are a little weaker
    assert set(eff.matched["suppress"]) == {1, 3} and set(eff.random["enhance"]) == {1, 3}


def test_reconstruction_mode_effects_are_relative_to_the_reconstruction_alone(llama_lm, facts):
    """Units that never fire change nothing when suppressed or enhanced: 0 exactly in reconstruction mode, whose
    reference is the reconstruction alone; the reconstruction itself moves P(answer) against the clean model."""
    fact = resolve_targets(facts, llama_lm.tokenizer)[0]
    units = _features(llama_lm, 1, "resid.post", threshold=0.03)
    acts = last_token_activations(llama_lm, [units], fact.prompts)[0]
    silent = [int(i) for i in np.flatnonzero((acts == 0).all(0))[:3]]
    cfg = DeltaProbConfig(ks=[1, 3], random_draws=0, matched_draws=0)
    err, rec = measure_sets(llama_lm, fact, [SetJob(units, silent, "error"), SetJob(units, silent, "reconstruction")], cfg)
    for op in ("suppress", "enhance"):
        assert rec.top[op][3].rel == 0.0 and rec.top[op][3].log == 0.0
        assert err.top[op][3].log == pytest.approx(0.0, abs=1e-5)
    assert abs(rec.recon.log) > 1e-3 and err.recon is None
    assert rec.all.log != pytest.approx(err.all.log, abs=1e-4)  # the positive control too is read against its own reference


def test_random_draws_are_seeded_per_fact_and_unit_set(lm, facts):
    fact = resolve_targets(facts, lm.tokenizer)[0]
    units = neuron_units(lm, 1)
    top = list(range(5))
    cfg = DeltaProbConfig(ks=[1, 3], ops=["suppress"], random_draws=2, matched_draws=0)
    a = measure_sets(lm, fact, [SetJob(units, top, key="x")], cfg)[0]
    b = measure_sets(lm, fact, [SetJob(neuron_units(lm, 0), top, key="y"), SetJob(units, top, key="x")], cfg)[1]
    c = measure_sets(lm, fact, [SetJob(units, top, key="x")], DeltaProbConfig(ks=[1, 3], ops=["suppress"], random_draws=2,
                                                                                 matched_draws=0, seed=7))[0]
    assert a.random["suppress"][3].log == pytest.approx(b.random["suppress"][3].log, abs=1e-6)  # other sets do not shift its draws
    assert a.random["suppress"][3].log != pytest.approx(c.random["suppress"][3].log, abs=1e-9)
    rng = random.Random(f"0:{fact.uid}:x")  # the control is the mean over the draws, each measured like top units
    draws = [rng.sample(range(units.n_units), 3) for _ in range(2)]
    each = measure_sets(lm, fact, [SetJob(units, d, controls=False) for d in draws], cfg)
    assert a.random["suppress"][3].log == pytest.approx(np.mean([e.top["suppress"][3].log for e in each]), abs=1e-6)
    assert a.random["suppress"][1].rel == pytest.approx(np.mean([e.top["suppress"][1].rel for e in each]), abs=1e-6)


def test_positive_control_is_the_whole_mlp_zeroed(lm, facts):
    """Every neuron of a layer suppressed = that layer's MLP output zeroed, measured through another site."""
    from kscope.model.sites import site_dim
    from kscope.units.base import NeuronUnits

    fact = resolve_targets(facts, lm.tokenizer)[0]
    cfg = DeltaProbConfig(ks=[1], ops=["suppress"], random_draws=0, matched_draws=0)
    out = NeuronUnits(Site(1, "mlp.out"), site_dim(lm.model, Site(1, "mlp.out")))
    got, ref = measure_sets(lm, fact, [SetJob(neuron_units(lm, 1), [0]), SetJob(out, [0])], cfg)
    assert got.all.log == pytest.approx(ref.all.log, abs=1e-5) and abs(got.all.log) > 1e-3


def test_effect_intervals_over_relations_are_cr2_and_the_report_says_so():
    """Marginal intervals hold with few, unequal relations (CR2, as the verdicts), and the report names how each result's
    intervals were made (results from before: the cluster bootstrap)."""
    import numpy as np

    from kscope.app.tables import interval_note as _interval_note
    from kscope.locate.conditions import Effect, SetEffects, SetSummary, summarize_effects
    from kscope.stats import cluster_robust

    rng = np.random.default_rng(0)
    clusters = ["a"] * 7 + ["b"] * 3 + ["c"] * 2 + ["d"] * 2 + ["e"]
    logs = rng.normal(-0.3, 0.2, len(clusters))
    rows = [SetEffects({"suppress": {10: Effect(float(np.expm1(v)), float(v))}}, all=Effect(0.0, 0.0)) for v in logs]
    got = summarize_effects(rows, clusters)
    want = cluster_robust(list(logs), clusters).interval
    assert got.top["suppress"][10].log == want and got.intervals == "CR2"
    assert _interval_note([got]).startswith("95 % CR2") and "bootstrap" in _interval_note([SetSummary(got.top)])
