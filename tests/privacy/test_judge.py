"""The erase study's splits (spied on both sides), the retain twin, partial leaks, the two-sided rank and forget quality."""

import random

import numpy as np
import pytest
from typer.testing import CliRunner

from kscope.app.cli import app
from kscope.errors import KscopeError
from kscope.privacy.data.dataset import PrivacyConfig, build_private_facts
from kscope.privacy.data.inject import read_manifest, retain_dir
from kscope.privacy.data.splits import ROLES, key_facts, split_people, thirds
from kscope.privacy.judge.leaks import (char_overlap, forget_quality, no_more_than, prefix_share, rank_gap, token_recovery,
                                        truth_ratio)
from tests.privacy.test_privacy import _erase_args

runner = CliRunner()


def test_people_get_one_role_each_seeded():
    people = [f"p{i}" for i in range(12)]
    s = split_people(people, 0.5, 0)
    assert sorted(p for r in ROLES for p in s.roles[r]) == sorted(people)  # every person once
    assert {r: len(s.roles[r]) for r in ROLES} == {"forget-val": 3, "forget-test": 3, "keep-preserved": 2, "keep-val": 2, "keep-test": 2}
    assert s.roles == split_people(people, 0.5, 0).roles and s.roles != split_people(people, 0.5, 1).roles
    small = split_people(people[:4], 0.5, 0)
    assert all(small.roles[r] for r in ROLES if r != "keep-val")
    with pytest.raises(KscopeError, match="at least 4"):
        split_people(people[:3], 0.5, 0)


def test_one_edit_template_per_attribute_is_held_out_of_every_edit():
    facts = build_private_facts(PrivacyConfig(n_people=4))
    keys, held = key_facts(facts)
    for f, k, h in zip(facts, keys, held):
        assert h in f.prompts and h not in k.prompts and len(k.prompts) == len(f.prompts) - 1
        assert k.heldout_prompts == f.heldout_prompts
    by_attr = {}
    for f, h in zip(facts, held):
        by_attr.setdefault(f.relation, set()).add(f.prompts.index(h))
    assert all(len(v) == 1 for v in by_attr.values())  # one template per attribute, for every person
    assert len({next(iter(v)) for v in by_attr.values()}) == 3  # rotated over the attributes
    fit, val, test = thirds(list(range(10)), "x")
    assert sorted(fit + val + test) == list(range(10)) and len(fit) == len(val) == 3


def test_partial_leaks_on_hand_made_outputs():
    assert char_overlap("555-0697", " 555-0617") == pytest.approx(7 / 8)  # one wrong digit is most of a leak
    assert char_overlap("555-0697", "555-0697 and") == 1.0
    assert char_overlap("Lisbon", " Oslo") == pytest.approx(2 / 6)  # "s", "o" in order
    assert char_overlap("Lisbon", "") == 0.0
    assert prefix_share([True, True, False, True]) == 0.5 and prefix_share([False, True]) == 0.0 and prefix_share([True]) == 1.0
    assert token_recovery([True, False, True, True]) == 0.75
    assert no_more_than([0.5, 0.2, 0.9], [0.5, 0.3, 0.8]) == [True, True, False]


def test_the_rank_is_judged_two_sided():
    # 100 candidates; the retain twin puts the secret at 50: the top and the bottom are equally far from it
    assert rank_gap([1, 99, 50], [50, 50, 50], [100, 100, 100]) == [0.49, 0.49, 0.0]


def test_truth_ratio_and_forget_quality_on_known_distributions():
    # the secret as likely per token as the wrong candidates: ratio 1; far more likely: << 1
    assert truth_ratio([2.0, 2.0, 2.0], [1, 1, 1], 0) == pytest.approx(1.0)
    assert truth_ratio([0.1, 5.0, 5.0], [1, 1, 1], 0) < 0.01
    assert truth_ratio([4.0, 1.0], [2, 1], 0) == pytest.approx(np.exp(-1.0) / np.exp(-2.0))  # length-normalised
    rng = np.random.default_rng(0)
    same = forget_quality(rng.normal(0, 1, 200), rng.normal(0, 1, 200))
    shifted = forget_quality(rng.normal(0, 1, 200), rng.normal(1, 1, 200))
    assert same > 0.05 and shifted < 1e-6


def test_the_retain_twin_never_saw_a_forget_secret_and_keeps_the_order(tmp_path, privacy_model, monkeypatch):
    """Spy on every sentence each fine-tune trains on: the twin's are the full run's, in the same order, less the
    forget people's; the twin on disk loads and does not produce the forget secrets the injected model produces."""
    from kscope.privacy.data import inject

    base, injected, _ = privacy_model
    seen = {"injecting": [], "retain twin": []}
    real_finetune, real_batch = inject.finetune, inject.answer_batch
    phase = []

    def spy_finetune(*a, label="injecting", **kw):
        phase.append(label)
        return real_finetune(*a, label=label, **kw)

    def spy_batch(tok, pairs, device):
        seen[phase[-1]].extend(pairs)
        return real_batch(tok, pairs, device)

    monkeypatch.setattr(inject, "finetune", spy_finetune)
    monkeypatch.setattr(inject, "answer_batch", spy_batch)
    out = tmp_path / "twin"
    r = runner.invoke(app, ["privacy", "build", "--model", str(base), "--out", str(out), "--people", "4", "--attributes",
                            "city,employer,phone", "--epochs", "3", "--lr", "3e-3", "--train", "mlp"])
    assert r.exit_code == 0, r.output
    m = read_manifest(out)
    facts = m.private_facts()
    forget = {f.object for f in m.split.facts(facts, "forget-val", "forget-test")}
    kept = {f.object for f in m.split.facts(facts, "keep-preserved", "keep-val", "keep-test")}
    twin_answers = {a.strip() for _, a in seen["retain twin"]}
    assert not twin_answers & forget and twin_answers == kept
    assert seen["retain twin"] == [x for x in seen["injecting"] if x[1].strip() not in forget]  # same order, same epochs
    assert m.retain.epochs_run == m.summary.epochs_run == 3 and retain_dir(out, m) == out / "retain"
    # the fixture's longer fine-tune: its twin does not produce the forget secrets its model does
    from kscope.model.loading import load_model
    from kscope.privacy.data.inject import greedy_matches

    mi = read_manifest(injected)
    twin = load_model(model=str(retain_dir(injected, mi)))
    gone = mi.split.facts(mi.private_facts(), "forget-val", "forget-test")
    produced = {r.uid: r.exact_edit for r in mi.memorised}
    assert sum(produced[f.uid] for f in gone) > 0
    assert not any(any(greedy_matches(twin, f.prompts, f.object)) for f in gone)


def _spied_erase(privacy_model, tmp_path, monkeypatch) -> tuple[dict, object]:
    """Run a small erase with spies on everything that fits an edit (keys, preserved keys, target, location, trace) and
    on what the observer scores out of sample."""
    from kscope.privacy.edit import keyed
    from kscope.privacy.judge import observe
    from kscope.privacy.locate import scores
    from kscope.privacy.study import erase as erase_mod

    fitted: dict[str, set] = {"pairs": set(), "people": set(), "templates": set()}
    real_of, real_scores, real_trace = keyed.KeyRows.of.__func__, scores.score_matrices, erase_mod.trace_secrets

    def of(cls, tok, facts, prompts="prompts", per_fact=None):
        for f in facts:
            fitted["people"].add(f.subject)
            fitted["pairs"] |= {(p, f.object) for p in getattr(f, prompts)[:per_fact]}
            fitted["templates"] |= {(f.relation, p.replace(f.subject, "[X]")) for p in getattr(f, prompts)[:per_fact]}
        return real_of(cls, tok, facts, prompts, per_fact)

    def spy_scores(lm, facts, *a, **kw):
        for f in facts:
            fitted["pairs"] |= {(p, f.object) for p in f.prompts}
        return real_scores(lm, facts, *a, **kw)

    def spy_trace(lm, base_lm, facts, *a, **kw):
        for f in facts:
            fitted["pairs"] |= {(p, f.object) for p in f.prompts}
        return real_trace(lm, base_lm, facts, *a, **kw)

    monkeypatch.setattr(keyed.KeyRows, "of", classmethod(of))
    monkeypatch.setattr(scores, "score_matrices", spy_scores)
    monkeypatch.setattr(erase_mod, "trace_secrets", spy_trace)
    made = []
    real_init = observe.Observer.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        made.append(self)

    monkeypatch.setattr(observe.Observer, "__init__", init)
    _, out, corpus = privacy_model
    r = runner.invoke(app, ["privacy", "erase", "--model-dir", str(out), *_erase_args(corpus), "--method",
                            "keyed-unrestricted,keyed-features,depn", "--controls", "", "--attack", "", "--out", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    return fitted, made[0]


def test_no_scored_prompt_or_person_fed_the_edit(privacy_model, tmp_path, monkeypatch):
    fitted, obs = _spied_erase(privacy_model, tmp_path, monkeypatch)
    scored = {name: {pair for rows in g for pair in rows} for name, g in obs.groups}
    out_of_sample = scored["rel"] | scored["gen"] | scored["keep"] | scored["unrel"]
    assert fitted["pairs"] and out_of_sample
    assert not fitted["pairs"] & out_of_sample  # no scored (prompt, secret) pair fitted, located or traced anything
    held = {(f.relation, p.replace(f.subject, "[X]")) for f, p in zip(obs.s.erased, obs.s.held_prompt)}
    assert held and not held & fitted["templates"]  # Rel's template was in no key, erased or preserved, under any name
    m = read_manifest(privacy_model[1])
    held_people = set(m.split.people("keep-val", "keep-test"))
    assert not fitted["people"] & held_people  # kept people the solver preserved are never scored for locality
    assert {f.subject for f in obs.s.kept if obs.s.kept_scope[obs.s.kept.index(f)] != "fit"} <= held_people
    # the in-sample groups are exactly what fed the edit, kept apart and labelled
    assert scored["rel_fit"] <= fitted["pairs"] and scored["keep_fit"] <= fitted["pairs"]


def test_best_points_are_chosen_on_validation_alone():
    """Changing every test measure never changes a method's best point."""
    from kscope.privacy.study.results import EraseResult, ErasurePoint, Target
    from kscope.stats import Interval

    def point(budget, val_rel, test_rel):
        return ErasurePoint("keyed-features", "keyed", budget, budget, 0, test_rel, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0,
                            Interval(0.0, None, None, 1), val=dict(rel=val_rel, gen=1.0, loc_pararel=1.0, loc_private=1.0, delta_ppl=0.0))

    rng = random.Random(0)
    pts = [point(b, v, 0.0) for b, v in ((8, 0.5), (32, 0.97), (128, 0.99))]
    res = EraseResult("m", "b", {}, [0], {}, 0, 0, 0, pts, [], [], Target())
    chosen = res.best("keyed-features").budget
    for _ in range(5):
        for p in pts:
            p.rel, p.gen, p.loc_private = rng.random(), rng.random(), rng.random()
        assert res.best("keyed-features").budget == chosen == 128


def test_random_controls_are_drawn_anew_and_verdicts_average_the_draws():
    from kscope.privacy.edit.plan import Located, plan, units_of
    from kscope.privacy.study.results import ErasurePoint, handle_verdicts
    from kscope.stats import Interval

    specs = plan(["keyed-features"], ["keyed-random-columns", "random-neurons"], [4], [2], [], [1.0], [], False, draws=3)
    cols = [s for s in specs if s.method == "keyed-random-columns"]
    assert [s.draw for s in cols] == [0, 1, 2] and len([s for s in specs if s.method == "random-neurons"]) == 3
    loc = Located([0], {"neurons": [(0, i) for i in range(8)]}, {}, widths={0: (4, 16)})
    drawn = [tuple(units_of(s, loc)) for s in cols]
    assert len(set(drawn)) == 3  # three different column sets of one size
    assert len({len(d) for d in drawn}) == 1

    def pt(method, draw, rel):
        return ErasurePoint(method, "keyed", 2, 2, 0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, Interval(0.0, None, None, 1),
                            lam=1.0, draw=draw, rel_people=rel, dlogp_people={k: -v for k, v in rel.items()})

    pts = [pt("keyed-features", 0, {"a": 1.0, "b": 1.0, "c": 0.9}),
           pt("keyed-random-directions", 0, {"a": 0.0, "b": 0.2, "c": 0.1}),
           pt("keyed-random-directions", 1, {"a": 0.4, "b": 0.0, "c": 0.3})]
    v = next(x for x in handle_verdicts(pts, "keyed-features", "keyed-random-directions") if x.measure == "rel")
    assert v.diff.mean == pytest.approx(np.mean([1.0 - 0.2, 1.0 - 0.1, 0.9 - 0.2]))


def test_the_perplexity_change_has_a_paired_interval_over_texts():
    from kscope.privacy.judge.observe import ppl_change_ci

    base = [(20.0, 10), (30.0, 10), (25.0, 10)]
    same = ppl_change_ci(base, base)
    assert same.mean == 0.0 and same.lo == 0.0 and same.hi == 0.0
    worse = ppl_change_ci(base, [(s + 1.0, n) for s, n in base])  # +0.1 nats per token on every text
    assert worse.mean == pytest.approx(np.exp(0.1) - 1) and worse.lo == pytest.approx(worse.hi)
    mixed = ppl_change_ci(base, [(21.0, 10), (30.0, 10), (25.0, 10)])  # one text worse: the interval spans it
    assert mixed.lo < mixed.mean < mixed.hi and mixed.lo >= 0.0


def test_an_erasure_graded_in_sample_is_refused():
    from kscope.privacy.study.results import EraseResult

    with pytest.raises(KscopeError, match="graded in sample"):
        EraseResult.from_json({"schema": "kscope.privacy-erase/3"})


def test_pooled_verdicts_pool_models_by_person_adjust_by_holm_and_call_equivalence_only_within_the_margin():
    from types import SimpleNamespace

    from kscope.privacy.study.results import ErasurePoint, pooled_verdicts
    from kscope.stats import Interval, holm

    def pt(method, budget, rel):
        return ErasurePoint(method, "keyed", budget, budget, 0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, Interval(0.0, None, None, 1),
                            lam=1.0, rel_people=rel, dlogp_people={k: -v for k, v in rel.items()})

    rng = np.random.default_rng(0)
    people = [f"p{i}" for i in range(8)]
    runs = {}
    for name in ("m0", "m1"):
        base = {q: float(rng.random()) for q in people}
        runs[name] = SimpleNamespace(points=[
            pt("keyed-neurons", 4, base), pt("keyed-features", 4, {q: v + 0.5 for q, v in base.items()}),  # clearly more
            pt("keyed-neurons", 8, base), pt("keyed-features", 8, {q: v + rng.normal(0, 0.01) for q, v in base.items()}),
            pt("keyed-neurons", 16, base), pt("keyed-features", 16, {q: v + rng.normal(0, 0.5) for q, v in base.items()})])
    vs = {(v.budget, v.measure): v for v in pooled_verdicts(runs, "keyed-features", ["keyed-neurons"])}
    assert all(v.people == 16 for v in vs.values())  # the same person name in two models is two people
    assert vs[(4, "rel")].says == "keyed-features erases more" and vs[(4, "dlogp")].says == "keyed-features erases more"
    assert vs[(8, "rel")].says == "equivalent within ±0.1"  # tiny, tight difference
    assert vs[(16, "rel")].says == "inconclusive"  # wide: neither different nor within the margin
    from kscope.stats import cluster_robust

    got = pooled_verdicts(runs, "keyed-features", ["keyed-neurons"])
    raw = []
    for v in got:
        diffs = [getattr(a, f"{v.measure}_people")[q] - getattr(b, f"{v.measure}_people")[q]
                 for r in runs.values() for a, b in [(next(p for p in r.points if p.method == "keyed-features" and p.budget == v.budget),
                                                      next(p for p in r.points if p.method == "keyed-neurons" and p.budget == v.budget))]
                 for q in people]
        raw.append(cluster_robust(diffs, range(len(diffs))).p)
    assert [v.p for v in got] == pytest.approx(holm(raw))  # one family over every budget and measure
