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
    monkeypatch.setattr(mono, "unit_activations",
                        lambda model, tok, units, prompts: torch.tensor([[-1.0 if p in related else 0.0] for p in prompts]))
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
    monkeypatch.setattr(mono, "unit_activations", lambda model, tok, units, prompts: torch.tensor(
        [[1.0 if p in chosen_on else -1.0 if p in facts[0].prompts else 0.0] for p in prompts]))
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
