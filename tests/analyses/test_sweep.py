"""The sweep on tiny models: every cell and control is there, verdicts follow the paired CR2 intervals, and
released SAEs (JumpReLU, Gemma-2 with soft-capping) load through the release path offline."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from kscope.analyses.sweep import SweepResult, activation_ranking
from kscope.analyses.verdicts import paired_verdict
from kscope.app.cli import app
from kscope.facts import write_fact_file
from tests.helpers import capital_facts, jumprelu_sae, save_tiny_model, tiny_gemma2, word_tokenizer

runner = CliRunner()
CORPUS = ["the capital of france is paris", "people in spain speak spanish", "new york is a city", "history and science today",
          "the eiffel tower is in paris", "the official language of italy is italian", "one two three and it is a country"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("sweep")
    model = root / "model"
    save_tiny_model(model)
    facts = root / "facts.jsonl"
    write_fact_file(capital_facts(), facts)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS * 12))
    return {"root": root, "model": str(model), "facts": str(facts), "corpus": str(corpus)}


def test_verdicts_follow_the_cluster_robust_interval():
    rel = ["a", "a", "b", "b", "c", "c"]
    assert paired_verdict([1.0, 1.1, 0.9, 1.2, 1.0, 1.3], [0.0, 0.1, -0.1, 0.05, 0.0, 0.1], rel).says == "features better"
    assert paired_verdict([0.0, 0.1, -0.1, 0.05, 0.0, 0.1], [1.0, 1.1, 0.9, 1.2, 1.0, 1.3], rel).says == "neurons better"
    assert paired_verdict([1.0, -1.0, 0.5, -0.4, 0.3, -0.3], [0.0, 0.1, 0.0, 0.1, 0.0, 0.0], rel).says == "inconclusive"
    # one relation: its facts are one piece of evidence, however many there are
    assert paired_verdict([1.0, 1.1, 0.9, 1.2], [0.0, 0.1, -0.1, 0.05], ["a"] * 4).says == "inconclusive"


def test_holm_decides_each_table_on_adjusted_p():
    from kscope.analyses.verdicts import Verdict, adjust
    from kscope.stats import Interval

    family = [Verdict(Interval(d, None, None, 9), p) for d, p in ((0.5, 0.01), (-0.4, 0.03), (0.2, 0.04))]
    adjust(family)
    assert [v.p_holm for v in family] == pytest.approx([0.03, 0.06, 0.06])
    assert [v.says for v in family] == ["features better", "inconclusive", "inconclusive"]  # 0.03 alone would pass


def test_interpretability_counts_each_distinct_unit_once():
    """Facts that share their top unit do not score it twice."""
    from kscope.analyses.quality import distinct_scores

    scored = []
    got = distinct_scores([[3, 1], [3, 2], [5, 3]], 1, lambda u: scored.append(u) or float(u))
    assert got == [3.0, 5.0] and scored == [3, 5]


def test_activation_ranking():
    import torch

    acts = torch.tensor([[0.1, -3.0, 2.0, 0.0], [0.1, -2.0, 2.0, 0.0]])
    assert activation_ranking(acts, signed=True, tau=0.5, k=3) == [1, 2, 0]
    assert activation_ranking(acts, signed=False, tau=0.5, k=2) == [2, 0]


def test_sweep_writes_every_cell_with_controls(files, tmp_path):
    out = tmp_path / "sweep"
    r = runner.invoke(app, ["sweep", "--model", files["model"], "--facts", files["facts"], "--known-top-k", "100",
                            "--min-known-prompts", "1", "--layers", "0-2:2", "--sites", "mlp.out,resid.post",
                            "--selection", "ig,activation", "--ablation", "error,reconstruction", "--ks", "1,3", "--steps", "3",
                            "--random-draws", "2", "--widths", "1,2", "--width-layer", "1", "--generate", "0", "--text",
                            files["corpus"], "--sae-max-tokens", "400", "--sae-expansion", "2", "--sae-k", "4", "--is-contexts", "30",
                            "--out-dir", str(out)])
    assert r.exit_code == 0, r.output
    res = SweepResult.load(out / "sweep.json")
    assert (out / "sweep.png").stat().st_size > 1000
    assert len(res.cells) == 2 * 2 * 2 * 2  # layers x sites x selections x ablations
    assert res.split.startswith("paraphrase") and res.n_relations == 2 and "selection prompts" in res.orientation
    comparisons = {"feature vs neuron", "feature vs basis", "feature vs pca", "feature vs random", "neuron vs random neuron",
                   "neuron vs matched neuron", "feature vs random feature", "feature vs matched feature"}
    for c in res.cells:
        assert set(c.units) == {"neuron", "feature", "basis", "pca", "random"}
        assert set(c.verdicts) == comparisons and set(c.verdicts["feature vs neuron"]) == {1, 3}
        v = c.verdicts["feature vs neuron"][3]
        assert set(v.ops) == {"suppress", "enhance"} and v.margin == 0.1
        assert v.p_holm is not None and v.p_holm >= v.p and all(o.p_holm >= o.p for o in v.ops.values())
        assert v.says in ("features better", "neurons better", "inconclusive", "equivalent within ±0.1") or v.says.startswith("disagree")
        f, n = c.units["feature"], c.units["neuron"]
        assert f.random["suppress"][3].log.n == 3 and n.matched["enhance"][1].rel.n == 3 and f.matched_norm is not None
        assert c.units["pca"].random is None and c.units["pca"].all is not None  # baselines: no random controls
        assert (f.recon is not None) == (c.ablation == "reconstruction")
        assert n.all is not None and f.all.log.n == 3
    e = [c for c in res.cells if c.ablation == "error" and c.selection == "ig"]
    rc = [c for c in res.cells if c.ablation == "reconstruction" and c.selection == "ig"]
    # one edit rule for every set of every cell and width (--ablate-to mean): every unit suppressed leaves the site at its
    # mean, for the basis as for PCA (and random directions)
    assert {u.ablated_to for c in res.cells for u in c.units.values()} | {w.effects.ablated_to for w in res.widths} == {"mean"}
    for c in (c for c in e if c.site == "resid.post"):
        assert c.units["basis"].all.log.mean == pytest.approx(c.units["pca"].all.log.mean, abs=1e-4)
        assert c.units["basis"].all.log.mean == pytest.approx(c.units["random"].all.log.mean, abs=1e-4)
        assert c.units["basis"].all.dx.mean == pytest.approx(c.units["pca"].all.dx.mean, rel=1e-3)
    # collateral on other relations' facts, for the first selection protocol only
    assert all(c.units["feature"].top["suppress"][3].collateral is not None for c in e)
    assert all(c.units["feature"].top["suppress"][3].collateral is None for c in res.cells if c.selection == "activation")
    # only features have a reconstruction: both protocols report the same numbers for every other set
    for kind in ("neuron", "basis", "pca", "random"):
        assert [c.units[kind].top["suppress"][3].log.mean for c in e] == [c.units[kind].top["suppress"][3].log.mean for c in rc]
    assert len(res.quality) == 4 and all(q.is_feature is not None and q.auroc_neuron is not None for q in res.quality)
    # unrelated prompts: other subjects of the fact's relation; spain has none, so 2 facts of one relation are paired
    assert all(q.auroc_verdict.diff.n == 2 and q.auroc_verdict.margin == 0.05 for q in res.quality)
    assert all(q.auroc_verdict.says == "inconclusive" for q in res.quality)  # one relation: no interval, no call
    assert all(q.null_neuron is not None and q.null_feature is not None and q.det_verdict is not None for q in res.quality)
    assert all(q.is_verdict.margin == 0.05 and q.det_verdict.margin == 0.05 for q in res.quality)
    # per fact, the first protocol's (ig, error term kept) ΔP/P of every set's top units, keyed as the explorer reads them
    from kscope.app.explorer import layer_grid, sweep_per_fact

    assert set(res.per_fact) == set(sweep_per_fact(tmp_path))  # <run>/sweep/sweep.json
    sets = {f"{L}/mlp.neurons/neuron" for L in (0, 2)} | {f"{L}/{s}/{k}" for L in (0, 2) for s in ("mlp.out", "resid.post")
                                                          for k in ("feature", "basis", "pca", "random")}
    assert res.per_fact and all(set(row) == sets for row in res.per_fact.values())
    e3 = {c.site: c for c in e if c.layer == 2}
    mean = [v["2/mlp.out/feature"] for v in res.per_fact.values() if v["2/mlp.out/feature"] is not None]
    assert sum(mean) / len(mean) == pytest.approx(e3["mlp.out"].units["feature"].top["suppress"][3].rel.mean, abs=1e-6)
    grid, _ = layer_grid(None, next(iter(res.per_fact.values())))
    assert set(grid["neuron"]) == {0, 2} and "feature @ resid.post" in grid
    assert {(w.site, w.expansion) for w in res.widths} == {(s, x) for s in ("mlp.out", "resid.post") for x in (1, 2)}
    assert all(w.effects.random["suppress"][3].log.n == 3 and w.effects.matched is not None and w.effects.all.log.n == 3
               for w in res.widths)  # controls at every width
    from kscope.app.report_sweep import sweep_band_table

    band = sweep_band_table(res)  # one verdict per cell and comparison: each band counts its one layer once
    assert all(len(cnt.split(" / ")) == 5 and sum(int(x) for x in cnt.split(" / ")) == 1 for row in band.rows for cnt in row[4:])
    assert {row[3] for row in band.rows} >= {"MLP neurons (paper)", "basis", "PCA", "random directions"}
    assert {row[1] for row in band.rows} >= {"interpretability score", "detection AUROC", "monosemanticity AUROC − null"}
    from kscope.app.report_sweep import sweep_quality_table, sweep_tables

    qt = sweep_quality_table(res)
    assert "CR2 intervals" in qt.title and "AUROC verdict on AUROC − null, paired over facts" in qt.title and "TOST" in qt.title
    assert {"null neurons", "null features", "detection neurons", "detection verdict"} <= set(qt.headers)
    assert len(qt.rows) == 4 and all(len(row) == len(qt.headers) and row[9] != "–" for row in qt.rows)
    assert all(t.markdown() for t in sweep_tables(res))
    assert set(res.saes) == {"0/mlp.out", "0/resid.post", "2/mlp.out", "2/resid.post"}
    assert all(i.stats and i.stats["n_train_tokens"] > 0 for i in res.saes.values())


def test_ablate_to_zero_zeroes_every_set(files, tmp_path):
    """``--ablate-to zero``: every set's codes zeroed (recorded), the basis then unlike PCA (whose codes are centred)."""
    out = tmp_path / "sweep"
    r = runner.invoke(app, ["sweep", "--model", files["model"], "--facts", files["facts"], "--known-top-k", "100",
                            "--min-known-prompts", "1", "--layers", "1", "--sites", "resid.post", "--ks", "1", "--steps", "2",
                            "--random-draws", "0", "--matched-draws", "0", "--measures", "delta", "--ablate-to", "zero",
                            "--collateral-facts", "0", "--generate", "0", "--text", files["corpus"], "--sae-max-tokens", "400",
                            "--sae-expansion", "2", "--sae-k", "4", "--out-dir", str(out)])
    assert r.exit_code == 0, r.output
    res = SweepResult.load(out / "sweep.json")
    assert res.config["edits"]["ablate_to"] == "zero"
    assert {u.ablated_to for c in res.cells for u in c.units.values()} == {"zero"}
    c = res.cells[0]
    assert c.units["basis"].all.log.mean != pytest.approx(c.units["pca"].all.log.mean, abs=1e-4)
    assert c.units["feature"].top["suppress"][1].collateral is None


def test_released_jumprelu_saes_on_gemma2_through_the_release_path(tmp_path, monkeypatch):
    """A SAELens release is loaded per layer by id; offline, the release resolves to JumpReLU SAEs saved locally.
    Gemma-2 soft-caps its logits, so attribution takes the autograd path."""
    import sae_lens

    from kscope.locate.attribution import plain_head

    model_dir = tmp_path / "gemma"
    g = tiny_gemma2()
    assert plain_head(g) is None
    g.save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    for layer in (0, 2):
        jumprelu_sae(32, 64, f"blocks.{layer}.hook_resid_post", seed=layer).save_model(str(tmp_path / f"rel-{layer}"))
    asked = []

    def from_pretrained(release, sae_id, device="cpu", **kw):
        asked.append((release, sae_id))
        return sae_lens.SAE.load_from_disk(str(tmp_path / f"rel-{sae_id.split('/')[0].split('_')[1]}"), device=device)

    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", from_pretrained)
    import huggingface_hub.constants as hub
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    repo = get_pretrained_saes_directory()["gemma-scope-2b-pt-res-canonical"].repo_id
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"))
    (tmp_path / "hf" / f"models--{repo.replace('/', '--')}" / "snapshots").mkdir(parents=True)  # as if in the local cache
    facts = tmp_path / "facts.jsonl"
    write_fact_file([capital_facts()[0], capital_facts()[2]], facts)
    out = tmp_path / "out"
    r = runner.invoke(app, ["sweep", "--model", str(model_dir), "--facts", str(facts), "--known-top-k", "100", "--min-known-prompts", "1",
                            "--layers", "0,2", "--sites", "resid.post", "--sae-release", "gemma-scope-2b-pt-res-canonical",
                            "--sae-id", "layer_{layer}/width_16k/canonical", "--ks", "1,2", "--steps", "3", "--random-draws", "1",
                            "--measures", "delta", "--baselines", "basis", "--out-dir", str(out)])
    assert r.exit_code == 0, r.output
    assert asked == [("gemma-scope-2b-pt-res-canonical", "layer_0/width_16k/canonical"),
                     ("gemma-scope-2b-pt-res-canonical", "layer_2/width_16k/canonical")]
    res = SweepResult.load(out / "sweep.json")
    assert {c.layer for c in res.cells} == {0, 2} and all(i.source == "release" for i in res.saes.values())
    assert all(c.units["feature"].top["suppress"][2].log.mean is not None and set(c.units) == {"neuron", "feature", "basis"}
               for c in res.cells)


@pytest.mark.parametrize("holdout", [True, False])
def test_units_are_chosen_on_prompts_they_are_never_measured_on(files, tmp_path, monkeypatch, holdout):
    """A spy on selection (IG) and measurement (ΔProb): held out, the two prompt sets of a fact are disjoint and
    cover it; in-sample (--no-holdout) they are the same."""
    import kscope.analyses.sweep as sweep

    chosen, measured = [], {}
    real_scores, real_measure = sweep.prompt_scores, sweep.measure_sets

    def spy_scores(lm, prompts, obj, *a, **kw):
        chosen.append(set(prompts))
        return real_scores(lm, prompts, obj, *a, **kw)

    def spy_measure(lm, fact, *a, **kw):
        measured.setdefault(fact.uid, set()).update(fact.prompts)
        return real_measure(lm, fact, *a, **kw)

    monkeypatch.setattr(sweep, "prompt_scores", spy_scores)
    monkeypatch.setattr(sweep, "measure_sets", spy_measure)
    facts = tmp_path / "facts.jsonl"
    write_fact_file([*capital_facts()[:2], sweep.Fact("italy", "language", "italian",
                                                      ["the official language of italy is", "people in italy speak",
                                                       "in italy people speak"])], facts)
    r = runner.invoke(app, ["sweep", "--model", files["model"], "--facts", str(facts), "--known-top-k", "100",
                            "--min-known-prompts", "1", "--layers", "1", "--sites", "mlp.out", "--measures", "delta", "--ks", "1",
                            "--steps", "2", "--random-draws", "1", "--generate", "0", "--text", files["corpus"],
                            "--sae-max-tokens", "400", "--sae-expansion", "2", "--sae-k", "4", "--out-dir", str(tmp_path / "s"),
                            *([] if holdout else ["--no-holdout"])])
    assert r.exit_code == 0, r.output
    loaded = {f.uid: f for f in sweep.FactConfig(facts=str(facts)).load()}
    assert set(measured) == set(loaded)
    for uid, f in loaded.items():
        sel, meas = set().union(*(c for c in chosen if c <= set(f.prompts))), measured[uid]
        if holdout:
            assert not sel & meas and sel | meas == set(f.prompts)
        else:
            assert sel == meas == set(f.prompts)


def test_fact_effects_keep_the_first_protocol_error_mode_largest_k():
    """``per_fact``: each fact's ΔP/P with each set's top units suppressed at the largest k, first selection protocol,
    error term kept; an undefined ΔP/P is None."""
    from kscope.analyses.sweep import SweepConfig, fact_effects
    from kscope.locate.conditions import Effect, SetEffects
    from kscope.results import encode

    def eff(rel1, rel3):
        return encode(SetEffects({"suppress": {1: Effect(rel1, 0.0), 3: Effect(rel3, 0.0)}, "enhance": {3: Effect(9.0, 0.0)}}))

    cfg = SweepConfig()
    cfg.selection, cfg.ablation, cfg.delta_prob.ks = ["activation", "ig"], ["reconstruction", "error"], [1, 3]
    facts = capital_facts()[:2]
    for i, f in enumerate(facts):
        f.uid = f"f{i}"
    rows = [{"effects": {"activation|error|0/mlp.neurons/neuron": eff(-0.1, -0.5), "activation|error|0/mlp.out/feature": eff(0.0, float("nan")),
                         "activation|reconstruction|0/mlp.out/feature": eff(0.0, -0.9), "ig|error|0/mlp.neurons/neuron": eff(0.0, -0.7)}},
            {"effects": {}}]
    assert fact_effects(cfg, facts, rows) == {"f0": {"0/mlp.neurons/neuron": -0.5, "0/mlp.out/feature": None}}


def test_quality_verdicts_compare_the_excess_over_each_sets_null():
    """Features with the higher raw AUROC but the smaller excess over their activity-matched null do not win; equal
    excesses within ±0.05 read "equivalent"; interpretability gets a detection verdict beside Pearson r."""
    from kscope.analyses.quality import FactAurocs, UnitScores, quality_cells

    rel = [r for r in "abcde" for _ in range(4)]
    w = [0.01 * ((i * 7) % 5 - 2) for i in range(20)]
    index = {"0/mlp.neurons/neuron": 0, "0/mlp.out/feature": 1}
    neurons = FactAurocs([0.7 + x for x in w], [0.5] * 20)
    feats = FactAurocs([0.9 - x for x in w], [0.85] * 20)  # raw +0.2, excess -0.15
    scores = [UnitScores([0.3 + x for x in w], [0.6 + x for x in w], [[str(i)] for i in range(20)]),
              UnitScores([0.8 + x for x in w], [0.6 - x for x in w], [[str(i)] for i in range(20)])]
    q, = quality_cells([0], ["mlp.out"], index, scores, [neurons, feats], rel)
    assert q.auroc_verdict.says == "neurons better" and q.auroc_verdict.diff.mean == pytest.approx(-0.15)
    assert q.null_feature.mean == pytest.approx(0.85) and q.auroc_feature.mean == pytest.approx(0.9)
    assert q.is_verdict.says == "features better" and q.det_verdict.says == "equivalent within ±0.05"
    feats = FactAurocs([0.9 - x for x in w], [0.7] * 20)  # excess 0.2 each
    q, = quality_cells([0], ["mlp.out"], index, None, [neurons, feats], rel)
    assert q.auroc_verdict.says == "equivalent within ±0.05" and q.is_verdict is None


def test_reproduce_gives_the_sweep_the_same_edits_as_compare():
    from kscope.app.reproduce import ReproduceConfig, stage_configs
    from kscope.locate.edits import EditConfig

    got = stage_configs(ReproduceConfig(stages=["compare", "sweep"], edits=EditConfig(ablate_to="zero", collateral=2)))
    assert got["sweep"].edits == got["compare"].edits == EditConfig(ablate_to="zero", collateral=2)
