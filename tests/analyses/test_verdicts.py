"""Per-operation verdicts: a comparison is called only when suppress and enhance agree (intersection-union), opposite
significant effects are a disagreement, equivalence needs TOST on both, else inconclusive; Holm per table; and the
sweep's tables and figure show a disagreement as such."""

from __future__ import annotations

import numpy as np
import pytest

from kscope.analyses.verdicts import MARGINS, adjust, iut_p, ops_verdict, paired_verdict, unpaired_verdict

REL = [r for r in "abcdef" for _ in range(3)]  # 6 relations, 3 facts each


def _ops(sup: float, enh: float, noise: float = 0.05, seed: int = 0):
    """Per-fact strengths of two unit sets whose difference is ``sup`` under suppression and ``enh`` under enhancement."""
    rng = np.random.default_rng(seed)
    n = len(REL)
    b = {op: list(rng.normal(1.0, 0.5, n)) for op in ("suppress", "enhance")}
    a = {op: [x + d + rng.normal(0, noise) for x in b[op]] for op, d in (("suppress", sup), ("enhance", enh))}
    return a, b


def test_called_only_when_both_operations_agree_with_the_larger_p():
    a, b = _ops(1.0, 0.5)
    v = ops_verdict(a, b, REL)
    assert v.says == "features better"
    assert v.p == max(v.ops["suppress"].p, v.ops["enhance"].p) == iut_p(v.ops["suppress"], v.ops["enhance"])
    a, b = _ops(-1.0, -0.5)
    assert ops_verdict(a, b, REL, ("features", "basis")).says == "basis better"


def test_opposite_significant_operations_disagree_and_the_combined_score_cannot_hide_it():
    """Suppression favours the basis by 6 nats, enhancement favours features by 2: the old combined score said the
    basis won (or nothing); the verdict names both directions."""
    a, b = _ops(-6.0, 2.0)
    v = ops_verdict(a, b, REL, ("features", "basis"))
    assert v.says == "disagree (suppress favours basis, enhance favours features)"
    assert v.p == 1.0 and v.diff.mean == pytest.approx(-2.0, abs=0.1)  # the combined mean stays, descriptive only


def test_one_operation_alone_is_not_enough():
    a, b = _ops(1.0, 0.0, noise=0.3)
    v = ops_verdict(a, b, REL)
    assert v.ops["suppress"].says == "features better" and v.says == "inconclusive"


def test_equivalent_only_when_both_operations_are_within_the_margin():
    a, b = _ops(0.0, 0.0, noise=0.01)
    v = ops_verdict(a, b, REL)
    assert v.says == f"equivalent within ±{MARGINS['log']:g}" and v.p_equivalent == max(o.p_equivalent for o in v.ops.values())
    a, b = _ops(0.0, 0.05, noise=0.4)  # enhancement too noisy to bound
    assert ops_verdict(a, b, REL).says == "inconclusive"


def test_holm_runs_per_table_on_the_call_and_on_each_operation():
    family = [ops_verdict(*_ops(d, d, noise=0.3, seed=s), REL) for s, d in enumerate((0.4, 0.2, 0.0, 0.3))]
    raw = [v.p for v in family]
    adjust(family)
    from kscope.stats import holm

    assert [v.p_holm for v in family] == pytest.approx(holm(raw))
    for op in ("suppress", "enhance"):
        assert [v.ops[op].p_holm for v in family] == pytest.approx(holm([v.ops[op].p for v in family]))
    for v in family:
        assert v.says != "no difference" and (v.says != "features better" or v.p_holm < 0.05)


def test_no_verdict_says_no_difference():
    rel = ["a", "a", "b", "b", "c", "c"]
    assert paired_verdict([1.0, -1.0, 0.5, -0.4, 0.3, -0.3], [0.0] * 6, rel).says == "inconclusive"
    assert paired_verdict([0.01, 0.0, 0.02, 0.01, 0.0, 0.01], [0.0] * 6, rel, margin=0.1).says == "equivalent within ±0.1"
    assert unpaired_verdict([0.50, 0.52, 0.49, 0.51], [0.50, 0.48, 0.51], margin=0.05).says == "equivalent within ±0.05"
    assert unpaired_verdict([0.50, 0.52, 0.49, 0.51], [0.50, 0.48, 0.51]).says == "inconclusive"


def test_the_figure_marks_a_disagreement_apart_from_every_other_verdict():
    from kscope.analyses.sweep_plot import DISAGREE_COLOR, verdict_mark
    from kscope.plots import UNIT_COLORS

    marks = {s: verdict_mark(s, "basis") for s in ("features better", "basis better", "inconclusive", "equivalent within ±0.1",
                                                    "disagree (suppress favours basis, enhance favours features)")}
    dis = marks.pop("disagree (suppress favours basis, enhance favours features)")
    assert dis[:2] == ("X", DISAGREE_COLOR) and DISAGREE_COLOR not in UNIT_COLORS.values()
    assert all(m[:2] != dis[:2] for m in marks.values()) and marks["basis better"][1] == UNIT_COLORS["basis"]


def test_the_tables_show_both_operations_and_count_disagreements():
    from types import SimpleNamespace

    from kscope.analyses.cells import Cell
    from kscope.app.report_sweep import sweep_band_table, sweep_verdict_table

    v = ops_verdict(*_ops(-6.0, 2.0), REL, ("features", "neurons"))
    cell = Cell(3, "resid.post", "ig", "error", units={}, verdicts={"feature vs neuron": {10: v}})
    res = SimpleNamespace(cells=[cell], layers=[3], sites=["resid.post"], quality=[], n_facts=18, n_relations=6, facts="x",
                          split="paraphrase", config={"delta_prob": {"ks": [10]}, "baselines": {"baselines": []},
                                                      "selection": ["ig"]})
    row = sweep_verdict_table(res, "ig", "error").rows[0]
    assert row[2].startswith("sup −") or row[2].startswith("sup -")
    assert "· enh +" in row[2] and row[2].endswith("disagree (suppress favours neurons, enhance favours features)")
    band = sweep_band_table(res)
    assert band.rows[0][4:] == ["0 / 0 / 1 / 0 / 0"] and "disagree" in band.title and "no difference" not in band.title
