"""The answers at the top of the report: one function writes them, and a sentence is never stronger than its numbers."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from kscope.analyses.verdicts import Verdict
from kscope.app.reproduce import ReproduceResult
from kscope.app.verdicts import answers, call, markdown_block
from kscope.stats import Interval

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def small():
    return ReproduceResult.load(DATA / "results_small.json")


def _with(res, verdict: Verdict):
    out = copy.copy(res)
    out.paired = {"locate/1": verdict}
    return out


def test_a_decided_verdict_gives_the_expected_sentence(small):
    v = Verdict(Interval(0.12, 0.05, 0.19, 10), 0.003, ["features", "neurons"], says="features better")
    a = next(x for x in answers(_with(small, v)) if x.key == "locate")
    assert a.says == "features better"
    assert a.sentence.endswith("features − neurons, suppressed and enhanced combined, +0.12 [+0.05, +0.19] (95 % cluster "
                               "bootstrap over relations, p 0.003): features beat neurons.")
    assert a.sentence.startswith("At layer 1 (10 facts; ") and "the top 10 features changes log P(answer) by " in a.sentence


@pytest.mark.parametrize("iv,p,expect", [
    (Interval(0.12, -0.01, 0.25, 10), 0.07, "inconclusive"),         # crosses 0, wider than the margin
    (Interval(0.02, -0.05, 0.09, 10), 0.50, "equivalent within ±0.1"),  # the whole interval inside ±0.1
    (Interval(0.02, -0.05, 0.15, 10), 0.60, "inconclusive"),          # inside on one side only
    (Interval(0.30, None, None, 1), None, "inconclusive"),            # no interval at all
])
def test_an_undecided_interval_never_says_beats(small, iv, p, expect):
    v = Verdict(iv, p, ["features", "neurons"], says="no difference")
    a = next(x for x in answers(_with(small, v)) if x.key == "locate")
    assert a.says == expect
    assert "beat neurons" not in a.sentence.replace("neither is shown to beat", "") and "no difference" not in a.sentence
    assert call(v, 0.1) == expect


def test_neurons_better_reads_the_other_way(small):
    v = Verdict(Interval(-0.2, -0.3, -0.1, 10), 0.001, ["features", "neurons"], says="neurons better")
    a = next(x for x in answers(_with(small, v)) if x.key == "locate")
    assert a.sentence.endswith("neurons beat features.") and "features beat neurons" not in a.sentence


def test_every_question_of_the_small_run_is_answered_and_none_says_no_difference(small):
    got = answers(small)
    assert [a.key for a in got] == ["locate", "sweep", "interpret", "monosemantic", "erase", "handle", "attack"]
    for a in got:
        assert a.sentence.endswith(".") and "no difference" not in a.sentence + a.says
    assert "not compared" not in got[0].sentence  # reproduce keeps the paired verdicts the per-fact detail gave
    # without the paired per-fact effects (an older results.json) the comparison is not made up
    old = copy.copy(small)
    old.paired = {}
    first = answers(old)[0]
    assert "not compared" in first.sentence and first.says == "inconclusive"
    md = markdown_block(got)
    assert md[1] == "**Answers**" and len(md) == 3 + len(got)


def test_the_markdown_report_opens_with_the_answers(small):
    from kscope.app.report import markdown

    lines = markdown(small).splitlines()
    assert lines[2] == "**Answers**" and lines[4].startswith("- **Do features beat neurons")
    assert lines.index("**Answers**") < next(i for i, x in enumerate(lines) if x.startswith("| "))


def test_pooled_privacy_verdicts_come_from_the_pooled_family(small):
    """Two privacy models: the handle answer quotes the Holm-adjusted pooled verdicts, never a stronger word."""
    res = copy.copy(small)
    erase = next(iter(small.privacy.values()))
    res.privacy = {"a": erase, "b": erase}
    a = next(x for x in answers(res) if x.key == "handle")
    assert "pooled over models, Holm-adjusted" in a.sentence
    assert a.says in ("inconclusive", "keyed-features erases more", "keyed-neurons erases more") or a.says.startswith("equivalent")
    e = next(x for x in answers(res) if x.key == "erase")
    assert "the test people of 2 privacy models" in e.sentence


def test_the_locate_answer_judges_suppress_and_enhance_apart(small):
    """A two-operation verdict: both ops' differences are quoted, and opposite significant ops are a disagreement, never
    a win."""
    from kscope.analyses.verdicts import ops_verdict

    rel = [r for r in "abcde" for _ in range(3)]
    base = [1.0 + 0.1 * i for i in range(15)]
    wobble = [0.01 * ((i * 7) % 5 - 2) for i in range(15)]
    a = {"suppress": [x - 3.0 + w for x, w in zip(base, wobble)], "enhance": [x + 1.0 - w for x, w in zip(base, wobble)]}
    v = ops_verdict(a, {"suppress": base, "enhance": base}, rel)
    got = next(x for x in answers(_with(small, v)) if x.key == "locate")
    assert got.says == "disagree (suppress favours neurons, enhance favours features)"
    assert "suppressed -3.00 [" in got.sentence and "enhanced +1.00 [" in got.sentence
    assert "neither is shown to beat" in got.sentence
    assert "features beat neurons" not in got.sentence and "neurons beat features" not in got.sentence
    a = {op: [x + 0.5 + w for x, w in zip(base, wobble)] for op in ("suppress", "enhance")}
    v = ops_verdict(a, {"suppress": base, "enhance": base}, rel)
    got = next(x for x in answers(_with(small, v)) if x.key == "locate")
    assert got.says == "features better" and got.sentence.endswith("features beat neurons.")
    assert "called only when both agree" in got.sentence


def test_the_monosemantic_answer_pairs_the_excess_over_each_sets_null(small):
    """Features with the higher raw AUROC but the smaller excess over their own null: the answer is on AUROC − null,
    never "features beat neurons", and quotes each set's AUROC beside its null."""
    from kscope.analyses.monosemanticity import UnitSeparation
    from kscope.analyses.selectivity import NullSummary

    res = copy.copy(small)
    res.paired = {}
    mono = copy.deepcopy(small.monosemanticity)
    for kind, (auc, null) in (("feature", (0.9, 0.85)), ("neuron", (0.7, 0.5))):
        mono.results[kind].rows = [UnitSeparation(f"f{i}", 0, 0, 1.0, 0.0, auc + 0.01 * ((i * 7) % 5 - 2), 0.5, [], [], [],
                                                  relation="abcde"[i % 5], null=null) for i in range(20)]
        mono.results[kind].summary.null = NullSummary(null, null - 0.02, null + 0.02, 20)
    res.monosemanticity = mono
    a = next(x for x in answers(res) if x.key == "monosemantic")
    assert a.says == "neurons better" and a.diff.mean == pytest.approx(-0.15)
    assert "AUROC − null per fact -0.15 [" in a.sentence and "against its null 0.85 (95 % of draws 0.83–0.87)" in a.sentence
    assert "features beat neurons" not in a.sentence


def test_the_interpret_answer_gives_the_detection_verdict_beside_pearson_r(small):
    from kscope.analyses.autointerp import UnitIS

    res = copy.copy(small)
    interp = copy.deepcopy(small.interpret)
    for kind, det in (("feature", 0.9), ("neuron", 0.6)):
        interp.results[kind].rows = [UnitIS(i, "", 0.5 + 0.01 * (i % 3), 10, 1.0, detection=det + 0.01 * (i % 3)) for i in range(12)]
    res.interpret = interp
    a = next(x for x in answers(res) if x.key == "interpret")
    assert "detection AUROC (top against random held-out windows" in a.sentence and "(Welch): features beat neurons." in a.sentence
    assert a.says == "Pearson r: equivalent within ±0.05; detection: features better"


def test_the_locate_answer_also_pairs_features_with_each_same_site_baseline_holm_over_them(small):
    """Compare's answer gives features − each same-site baseline beside the paper's comparison, each judged per
    operation, the baselines one Holm family (the paper's comparison with neurons stays the primary, unadjusted)."""
    from kscope.analyses.verdicts import adjust, ops_verdict
    from kscope.app.verdicts import _baseline_verdicts

    rel = [r for r in "abcde" for _ in range(3)]
    base = [1.0 + 0.1 * i for i in range(15)]
    wobble = [0.01 * ((i * 7) % 5 - 2) for i in range(15)]
    ahead = {op: [x + 0.5 + w for x, w in zip(base, wobble)] for op in ("suppress", "enhance")}
    even = {op: [x + w for x, w in zip(base, wobble)] for op in ("suppress", "enhance")}
    v = ops_verdict(ahead, {"suppress": base, "enhance": base}, rel)
    b = {"basis": ops_verdict(ahead, {"suppress": base, "enhance": base}, rel, ("features", "basis")),
         "pca": ops_verdict(even, {"suppress": base, "enhance": base}, rel, ("features", "PCA"))}
    adjust(b.values())
    res = copy.copy(small)
    res.paired = {"locate/1": v, "locate/1/basis": b["basis"], "locate/1/pca": b["pca"]}
    got = next(x for x in answers(res) if x.key == "locate")
    assert got.says == "features better"  # the primary verdict is the comparison with neurons
    tail = got.sentence.split("Against the same site's units (Holm over them), features ", 1)[1]
    assert tail.startswith("− basis (suppressed +0.50 [") and "features beat basis" in tail
    assert "− PCA (suppressed" in tail and "PCA: inconclusive" not in tail and "equivalent within" in tail
    assert b["basis"].p_holm is not None and b["basis"].p_holm >= b["basis"].p  # adjusted over the family
    # computed from a compare result's per-fact effects when the run has them: one Holm family over its baselines
    assert _baseline_verdicts(small.compare, 1) == {} or all(x.p_holm is not None for x in _baseline_verdicts(small.compare, 1).values())


def test_one_tally_sorts_verdicts_for_the_sweep_answer_and_the_band_table():
    """``tally`` keeps each bucket's keys in order; the band table's counts are its lengths (old "no difference":
    inconclusive)."""
    from kscope.app.report_sweep import _counts
    from kscope.app.verdicts import tally

    says = {0: "features better", 2: "MLP neurons better", 4: "disagree (suppress: features)", 6: "equivalent within ±0.1",
            8: "no difference", 10: "features better"}
    assert tally(says, "features", "MLP neurons") == ([0, 10], [2], [4], [6], [8])
    assert tally(says) == ([0, 10], [], [4], [6], [2, 8])
    assert _counts(list(says.values()), ("features", "MLP neurons")) == "2 / 1 / 1 / 1 / 1" and _counts([], ("a", "b")) == "–"


def test_the_attack_answer_pairs_each_edit_with_the_twin_per_person(small):
    """Head Projection per test person, edit − retain twin paired, Holm over the attacked states: clearly above says so;
    identical differences on every person (no spread) are inconclusive, never a verdict; several models are clusters,
    counted by the models that gave values; the answer's cells are the twin table's."""
    from kscope.app.report_attacks import twin_table
    from kscope.privacy.study.graded import TWIN

    hp = "head-projection@4"
    res = copy.deepcopy(small)
    erase = next(iter(res.privacy.values()))
    rows = {r.method: r for r in erase.attacks}
    twin, edit = rows[TWIN], rows["keyed-unrestricted"]
    twin.people[hp] = {"p1": 0.0, "p2": 0.1, "p3": 0.0}
    edit.people[hp] = {"p1": 0.6, "p2": 0.8, "p3": 0.7}
    erase.attacks = [r for r in erase.attacks if r.method in (TWIN, "unedited", "keyed-unrestricted")]
    a = next(x for x in answers(res) if x.key == "attack")
    assert a.says == "leaks more than the retain twin" and a.diff.lo > 0 and a.diff.mean == pytest.approx(2.0 / 3)
    row = next(r for r in twin_table(res.privacy).rows if r[0] == "keyed-unrestricted")
    assert row[5] == a.diff.fmt("+.2f") and row[-1] == a.says and row[2] == "3 people"
    edit.people[hp] = {w: x + 0.4 for w, x in twin.people[hp].items()}  # +0.4 on every person: no spread
    a = next(x for x in answers(res) if x.key == "attack")
    assert a.says == "inconclusive (no spread over 3 people)" and a.diff.mean == pytest.approx(0.4)
    two = copy.copy(res)
    other = copy.deepcopy(erase)
    next(r for r in other.attacks if r.method == "keyed-unrestricted").people[hp] = {"q1": 0.2, "q2": 0.3}
    next(r for r in other.attacks if r.method == TWIN).people[hp] = {"q1": 0.0, "q2": 0.1}
    two.privacy = {"a": erase, "b": other}
    a = next(x for x in answers(two) if x.key == "attack")
    assert "(2 of 2 models)" in a.sentence and a.figure == "privacy-pooled-whitebox.png"
    assert a.table == "Erasure across privacy models: attacks against the retain twin"
    assert next(r for r in twin_table(two.privacy).rows if r[0] == "keyed-unrestricted")[2] == "2 models"
    other.attacks = [r for r in other.attacks if r.method != TWIN]  # no twin on b: only a's people pair, by person
    a = next(x for x in answers(two) if x.key == "attack")
    assert "(1 of 2 models)" in a.sentence
