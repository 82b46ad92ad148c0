import json
import random
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import torch

from kscope.units.decompositions import ica_units, pca_units, random_units, topk_abs
from kscope.analyses.faithfulness import reconstruction_scores
from kscope.analyses.autointerp import ActivationRecords, InterpretConfig, LLMExplainer, TokenExplainer, interpretability_score, pearson
from kscope.analyses.monosemanticity import auroc, cohens_d, mix_curve, mwu_p, separation
from kscope.model.sites import Site

SITE = Site(0, "mlp.out")


def _rank_k(n=400, d=12, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) @ torch.randn(k, d, generator=g) + 2.0


def test_pca_on_rank_k_data_reconstructs_exactly():
    x = _rank_k(k=3)
    u = pca_units(SITE, x, n=12, k=3)
    s = reconstruction_scores(u, x)
    assert s["explained_variance"] > 1 - 1e-5 and s["mse"] < 1e-8
    assert s["l0"] <= 3
    # With fewer active codes than the rank it cannot be exact.
    assert reconstruction_scores(pca_units(SITE, x, n=12, k=2), x)["explained_variance"] < 0.99


def test_ica_and_random_full_basis_reconstruct():
    x = _rank_k(d=6, k=6)
    assert reconstruction_scores(ica_units(SITE, x, n=6, k=None), x)["explained_variance"] > 0.999
    r = random_units(SITE, 6, 6, None, mean=x.mean(0))
    assert reconstruction_scores(r, x)["explained_variance"] > 1 - 1e-5
    assert reconstruction_scores(random_units(SITE, 6, 6, 1, mean=x.mean(0)), x)["explained_variance"] < 0.9


def test_topk_abs():
    c = torch.tensor([[3.0, -5.0, 1.0, 0.5]])
    assert topk_abs(c, 2).tolist() == [[3.0, -5.0, 0.0, 0.0]]


def test_separation_known_answers():
    rel, unrel = [1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0]
    assert auroc(rel, unrel) == 1.0
    assert auroc(unrel, rel) == 0.0
    assert auroc([1.0, 1.0], [1.0, 1.0]) == 0.5
    assert cohens_d(rel, unrel) > 2
    assert cohens_d([1.0, 1.0], [1.0, 1.0]) == 0.0
    assert mwu_p(rel, unrel) < 0.05
    assert mwu_p([0.0, 0.0], [0.0, 0.0]) == 1.0
    s = separation(np.random.default_rng(0).normal(size=200), np.random.default_rng(1).normal(size=200))
    assert 0.4 < s["auroc"] < 0.6 and s["mwu_p"] > 0.05


def test_mix_curve_of_a_monosemantic_unit_is_the_related_fraction():
    curve = mix_curve(np.ones(5), np.zeros(5), [0.0, 0.25, 0.5, 1.0], pool=8, rng=random.Random(0))
    assert curve == pytest.approx([0.0, 0.25, 0.5, 1.0])


def test_pearson():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0


def _records(n=60, T=8, seed=0):
    """Unit 0 fires 2.0 on ' paris' only; unit 1 is noise."""
    rng = random.Random(seed)
    vocab = [" the", " capital", " paris", " is", " of", " france"]
    toks = [[rng.choice(vocab) for _ in range(T)] for _ in range(n)]
    g = torch.Generator().manual_seed(seed)
    acts = torch.zeros(n, T, 2)
    for i, w in enumerate(toks):
        for t, tok in enumerate(w):
            acts[i, t, 0] = 2.0 if tok == " paris" else 0.0
    acts[..., 1] = torch.rand(n, T, generator=g)
    return ActivationRecords(toks, acts)


def test_token_explainer_scores_a_token_detector_near_one():
    rec = _records()
    cfg = InterpretConfig(top_contexts=10, heldout_frac=0.4)
    good = interpretability_score(rec, 0, TokenExplainer(3), cfg)
    noise = interpretability_score(rec, 1, TokenExplainer(3), cfg)
    assert " paris" in good["explanation"]
    assert good["score"] > 0.99
    assert abs(noise["score"]) < 0.5


def test_negatively_firing_token_detector_scores_like_its_mirror():
    rec = _records()
    neg = ActivationRecords(rec.tokens, -rec.acts)
    cfg = InterpretConfig(top_contexts=10, heldout_frac=0.4)
    pos, mirror = interpretability_score(rec, 0, TokenExplainer(3), cfg), interpretability_score(neg, 0, TokenExplainer(3), cfg)
    assert mirror["sign"] == -1.0 and pos["sign"] == 1.0
    assert mirror["score"] == pytest.approx(pos["score"]) and mirror["score"] > 0.99
    assert mirror["explanation"] == pos["explanation"]


class _FakeLLM(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][0]["content"]
        if text.startswith("A neuron in a language model"):
            answer = "the word paris"
        else:
            answer = "9" if "paris" in text.split("Text:")[1] else "0"
        out = json.dumps({"choices": [{"message": {"content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def test_llm_explainer_through_openai_compatible_endpoint():
    server = HTTPServer(("127.0.0.1", 0), _FakeLLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ex = LLMExplainer(f"http://127.0.0.1:{server.server_port}/v1", "fake")
        r = interpretability_score(_records(n=30), 0, ex, InterpretConfig(top_contexts=5, heldout_frac=0.5), context_level=True)
        assert r["explanation"] == "the word paris"
        assert r["score"] > 0.9
    finally:
        server.shutdown()


def test_negative_firing_unit_is_oriented(llama_lm, facts, monkeypatch):
    """A unit that is strongly negative exactly on its fact's prompts counts as selective (AUROC 1)."""
    from kscope.analyses import monosemanticity as mono
    from kscope.facts import resolve_targets
    from kscope.units.base import Units

    facts = resolve_targets(facts, llama_lm.tokenizer)
    related = set(facts[0].prompts)
    monkeypatch.setattr(mono, "last_token_activations",
                        lambda lm, sets, prompts, *a: [torch.tensor([[-1.0 if p in related else 0.0] for p in prompts])])
    res = mono.unit_monosemanticity(llama_lm, facts, Units(SITE, 1), [[0], [0], [0]], mono.MonosemanticityConfig(top_units=1), facts)
    row = res.rows[0]
    assert row.sign == -1.0 and row.auroc == 1.0 and row.mwu_p < 0.05
    assert res.rows[1].sign == 1.0  # facts whose prompts never fire stay unflipped


def test_orientation_comes_from_the_selection_prompts(llama_lm, facts, monkeypatch):
    """A unit negative on its fact's scored prompts but positive on the prompts it was chosen on is not flipped."""
    from kscope.analyses import monosemanticity as mono
    from kscope.facts import resolve_targets
    from kscope.units.base import Units

    facts = resolve_targets(facts, llama_lm.tokenizer)
    selected = [f.with_prompts(f.prompts[:1]) for f in facts]
    chosen_on = {f.prompts[0] for f in selected}
    monkeypatch.setattr(mono, "last_token_activations", lambda lm, sets, prompts, *a: [torch.tensor(
        [[1.0 if p in chosen_on else -1.0 if p in facts[0].prompts else 0.0] for p in prompts])])
    res = mono.unit_monosemanticity(llama_lm, [f.with_prompts(f.prompts[1:]) for f in facts], Units(SITE, 1), [[0], [0], [0]],
                                    mono.MonosemanticityConfig(top_units=1), selected)
    assert res.rows[0].sign == 1.0 and res.rows[0].auroc == 0.0


def _null_aurocs(kind: str, held_out: bool, n: int = 4000, seed: int = 0) -> np.ndarray:
    """AUROC of units whose activations have nothing to do with the fact: 3 selection, 2 related, 24 unrelated prompts."""
    from kscope.analyses.monosemanticity import oriented_auroc

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(size=3 + 2 + 24)
        if kind == "sparse":  # non-negative and mostly silent, like TopK features
            x = np.where(rng.random(x.size) < 0.2, np.abs(x), 0.0)
        sel, rel, unrel = x[:3], x[3:5], x[5:]
        out.append(oriented_auroc(sel if held_out else rel, rel, unrel))
    return np.asarray(out)


@pytest.mark.parametrize("kind", ["symmetric", "sparse"])
def test_null_units_score_one_half_when_oriented_on_the_selection_prompts(kind):
    assert abs(_null_aurocs(kind, held_out=True).mean() - 0.5) < 0.05


def test_orienting_on_the_scored_prompts_inflates_symmetric_units():
    """The bias the held-out orientation removes: about 0.67 for symmetric units, still 0.5 for non-negative ones."""
    assert _null_aurocs("symmetric", held_out=False).mean() > 0.62
    assert abs(_null_aurocs("sparse", held_out=False).mean() - 0.5) < 0.05


def _synthetic_facts(n_rel=4, n_subj=6, n_templates=4):
    """Facts of ``n_rel`` relations, each asking ``n_subj`` subjects through the same ``n_templates`` templates; the first
    half of the templates select, the second half measure."""
    from kscope.facts import Fact

    facts = [Fact(f"s{r}x{j}", f"r{r}", f"o{r}x{j}", [f"template {k} of relation {r} asks about s{r}x{j} :" for k in range(n_templates)])
             for r in range(n_rel) for j in range(n_subj)]
    half = n_templates // 2
    return [f.with_prompts(f.prompts[half:]) for f in facts], [f.with_prompts(f.prompts[:half]) for f in facts]


def _null_run(seed: int, draws: int = 10):
    """Random units (half dense, half sparse and non-negative) on every prompt, each fact's top units drawn at random."""
    from kscope.analyses import monosemanticity as mono

    measured, selected = _synthetic_facts()
    cfg = mono.MonosemanticityConfig(top_units=3, null_draws=draws, seed=seed, mix_fracs=[0.5])
    unrelated = mono.unrelated_prompts(measured, cfg.n_unrelated, cfg.seed)
    pool = list(dict.fromkeys(p for i, f in enumerate(measured) for p in [*f.prompts, *unrelated[i], *selected[i].prompts]))
    rng = np.random.default_rng(seed)
    acts = rng.normal(size=(len(pool), 40))
    acts[:, 20:] = np.where(rng.random((len(pool), 20)) < 0.3, np.abs(acts[:, 20:]), 0.0)
    top = [list(rng.choice(40, 5, replace=False)) for _ in measured]
    return mono.score_set("random", {p: j for j, p in enumerate(pool)}, acts, measured, selected, unrelated, top, cfg).summary


def test_monosemanticity_excess_over_the_null_is_zero_for_random_units():
    s = _null_run(0, draws=20)
    assert s.n_relations == 4 and s.n_units == 72 and s.null.draws == 20
    assert abs(s.null.mean - 0.5) < 0.03 and s.null.lo <= s.null.mean <= s.null.hi
    assert abs(s.excess.mean) < 0.05 and s.excess.lo < 0 < s.excess.hi


def test_monosemanticity_excess_interval_covers_zero_under_the_null():
    """Over independent null runs the 95 % CR2 interval (4 relations) covers 0 most of the time."""
    covered = [s.excess.lo <= 0 <= s.excess.hi for s in (_null_run(seed, draws=5) for seed in range(1, 26))]
    assert np.mean(covered) >= 0.85


def test_monosemanticity_beats_its_null_for_a_selective_unit():
    """A unit that fires on its own fact's subject only sits far above activity-matched random units."""
    from kscope.analyses import monosemanticity as mono

    measured, selected = _synthetic_facts()
    cfg = mono.MonosemanticityConfig(top_units=1, null_draws=10)
    unrelated = mono.unrelated_prompts(measured, cfg.n_unrelated, cfg.seed)
    pool = list(dict.fromkeys(p for i, f in enumerate(measured) for p in [*f.prompts, *unrelated[i], *selected[i].prompts]))
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(len(pool), 40))
    for i, f in enumerate(measured):  # unit i fires on fact i's subject
        for j, p in enumerate(pool):
            acts[j, i] = 3.0 + rng.normal() if f" {f.subject} " in p else rng.normal()
    s = mono.score_set("x", {p: j for j, p in enumerate(pool)}, acts, measured, selected, unrelated, [[i] for i in range(24)], cfg).summary
    assert s.auroc.mean > 0.9 and s.excess.lo > 0.25 and s.excess_p < 0.05


def test_unrelated_prompts_share_relation_and_template_with_the_related_ones(monkeypatch):
    """Spy on what unit_monosemanticity scores: every unrelated prompt of a fact is one of its own measured prompts with
    its subject replaced by another subject of its relation (another object); none comes from another relation."""
    from kscope.analyses import monosemanticity as mono
    from kscope.facts import load_facts, split_prompts
    from kscope.units.base import Units

    facts = load_facts(None)  # the built-in set
    views = [split_prompts(f, True) for f in facts]
    measured, selected = [m for _, m in views], [s for s, _ in views]
    seen: dict = {}
    monkeypatch.setattr(mono, "last_token_activations", lambda lm, sets, prompts, *a: seen.setdefault("pool", prompts) and
                        [torch.randn(len(prompts), 4, generator=torch.Generator().manual_seed(0))])
    real = mono.score_set
    monkeypatch.setattr(mono, "score_set", lambda *a: seen.setdefault("unrelated", a[5]) and real(*a))
    res = mono.unit_monosemanticity(None, measured, Units(SITE, 4), [[0, 1]] * len(facts), mono.MonosemanticityConfig(top_units=2),
                                    selected)
    assert res.rows and set(seen["pool"]) >= {p for u in seen["unrelated"] for p in u}
    n_checked = 0
    for f, unrel in zip(measured, seen["unrelated"]):
        peers = {g.subject for g in measured if g.relation == f.relation and g.subject != f.subject and g.object != f.object}
        made = {p.replace(f.subject, o) for p in f.prompts for o in peers}
        assert set(unrel) <= made and not set(unrel) & set(f.prompts)
        assert len(unrel) == min(24, len(made))
        others = {p for g in measured if g.relation != f.relation for p in g.prompts}
        assert not set(unrel) & others
        n_checked += len(unrel)
    assert n_checked > 100


def _detector_records(dense: bool, n=240, T=16, seed=0):
    """A token detector (2.0 at ' paris', 0 elsewhere); ``dense``: the same detector riding on uniform [0, 1) activity at
    every token, as a dense neuron's would."""
    rng = random.Random(seed)
    vocab = [f" w{i}" for i in range(40)] + [" paris"]
    weights = [1.0] * 40 + [1.0]  # ' paris' in a third of the windows
    toks = [rng.choices(vocab, weights, k=T) for _ in range(n)]
    acts = torch.tensor([[[2.0 if t == " paris" else 0.0] for t in w] for w in toks])
    if dense:
        acts = acts + torch.rand(n, T, 1, generator=torch.Generator().manual_seed(seed))
    return ActivationRecords(toks, acts)


def test_detection_score_is_insensitive_to_sparsity_where_pearson_is_not():
    cfg = InterpretConfig(top_contexts=20, heldout_frac=0.4)
    got = {d: [interpretability_score(_detector_records(d, seed=s), 0, TokenExplainer(10), cfg) for s in range(4)] for d in (False, True)}
    mean = lambda d, key: float(np.mean([r[key] for r in got[d]]))  # noqa: E731
    assert mean(False, "score") > 0.99 and mean(True, "score") < 0.8  # Pearson r punishes the dense background
    assert abs(mean(False, "detection") - mean(True, "detection")) < 0.03 and mean(True, "detection") > 0.9


def test_interpretability_intervals_cluster_units_by_fact():
    from kscope.analyses.autointerp import UnitIS, fact_clusters, summarize_is

    assert fact_clusters([["a"], ["a", "b"], ["c"], ["b"], []]) == ["a", "a", "c", "a", "unit 4"]
    rows = [UnitIS(u, {}, s, 10, 1.0, detection=d, facts=f) for u, s, d, f in
            [(0, 0.5, 0.9, ["a"]), (1, 0.6, 0.8, ["a"]), (2, 0.1, 0.6, ["b"]), (3, 0.2, 0.7, ["c"])]]
    r = summarize_is("x", "TokenExplainer", rows)
    assert r.n_clusters == 3 and r.summary.n == 4 and r.detection.mean == pytest.approx(0.75)


def test_analyses_score_the_same_site_baselines_a_located_run_ranked(tmp_path, facts):
    """With --located, monosemanticity and interpret score every baseline the compare run ranked, on its ranking."""
    from typer.testing import CliRunner

    from kscope.app.cli import app
    from kscope.facts import write_fact_file
    from tests.helpers import save_tiny_model

    runner = CliRunner()
    save_tiny_model(tmp_path / "tiny")
    write_fact_file(facts, tmp_path / "facts.jsonl")
    base = ["--model", str(tmp_path / "tiny"), "--facts", str(tmp_path / "facts.jsonl"), "--known-top-k", "100", "--min-known-prompts",
            "1", "--generate", "40", "--gen-len", "16", "--sae-expansion", "2", "--sae-k", "4"]
    r = runner.invoke(app, ["compare", *base, "--layers", "1", "--steps", "2", "--out", str(tmp_path / "compare.json")])
    assert r.exit_code == 0, r.output
    located = json.loads((tmp_path / "compare.json").read_text())
    for cmd, extra in (("monosemanticity", ["--top-units", "2"]), ("interpret", ["--contexts", "40"])):
        r = runner.invoke(app, [cmd, *base, "--layer", "1", "--located", str(tmp_path / "compare.json"), "--out-dir", str(tmp_path / "o"),
                                *extra])
        assert r.exit_code == 0, r.output
        res = json.loads((tmp_path / "o" / f"{cmd}.json").read_text())
        assert list(res["results"]) == ["neuron", "feature", "basis", "pca", "random"]
    by_uid = {f["uid"]: f["layers"]["1"] for f in located["facts"]}
    mono = json.loads((tmp_path / "o" / "monosemanticity.json").read_text())["results"]
    for kind in ("basis", "pca", "random"):
        rows = mono[kind]["rows"]
        assert rows and all(r["unit"] == by_uid[r["fact"]][kind]["top"][r["rank"]]["unit"] for r in rows)
        assert all(r["null"] is not None for r in rows) and mono[kind]["summary"]["null"]["draws"] == 20
