"""Verdicts: which of two unit kinds moves the answer more (or scores higher), from per-fact or per-unit values.

Paired values (the same facts) are compared by the mean difference with a CR2 cluster-robust interval over relations
(``stats.cluster_robust``: Bell-McCaffrey df, which holds with 5-11 unequal relations where the cluster bootstrap ran
short); unpaired values (e.g. interpretability of distinct units) by Welch's test. A verdict says "A better" /
"B better" only when its p (Holm-adjusted over its table) is below ``ALPHA``; otherwise "equivalent within ±margin" when
the TOST p (Holm-adjusted over the same table) is below ``ALPHA``, else "inconclusive", never "no difference".

An edit's two operations are judged apart (``ops_verdict``): suppression can move log P by -27 nats, enhancement at
most by -log P, so one averaged score lets the larger hide an opposite smaller one. "A better" needs both to favour A
(intersection-union test: its p is the larger of the two ops' p); both significant and opposite is "disagree";
"equivalent" needs both equivalent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from kscope.stats import Interval, Test, cluster_robust, equivalence_p, holm, welch_equivalence_p, welch_test

ALPHA = 0.05
MARGINS = {"log": 0.10, "is": 0.05, "auroc": 0.05}
"""Equivalence margins, fixed before looking: log P'/P in nats (each operation), interpretability score (Pearson r),
monosemanticity AUROC."""
OPS = ("suppress", "enhance")
INCONCLUSIVE = "inconclusive"


@dataclass
class Verdict:
    """``diff``: mean of ``a - b`` with its unadjusted 95 % interval; ``p``: two-sided p of a zero difference;
    ``p_equivalent``: TOST p of a difference within ±``margin`` (None without a margin); ``*_holm``: adjusted over the
    verdict's table; ``says``: "<a> better", "<b> better", "equivalent within ±m" or "inconclusive" (on the adjusted
    p's). A two-operation verdict (``ops_verdict``) keeps each op's verdict in ``ops``; its ``p`` is the
    intersection-union p, its ``diff`` the two ops' mean difference (descriptive, not what it is decided on), and it may
    say "disagree (suppress favours X, enhance favours Y)"."""

    diff: Interval
    p: float | None
    names: list[str] = field(default_factory=lambda: ["features", "neurons"])
    p_holm: float | None = None
    says: str = INCONCLUSIVE
    p_equivalent: float | None = None
    p_equivalent_holm: float | None = None
    margin: float | None = None
    ops: dict[str, Verdict] = field(default_factory=dict)


def decide(v: Verdict, p: float | None, p_equivalent: float | None = None) -> None:
    """Set ``v.says`` from ``p`` and ``p_equivalent`` (after Holm: the adjusted ones) and the sign of the difference;
    a two-operation verdict from its ops' (already decided) p's too."""
    if v.ops:
        _decide_ops(v, p, p_equivalent)
        return
    d = v.diff.mean
    if p is not None and d is not None and d == d and d != 0 and p < ALPHA:
        v.says = f"{v.names[0] if d > 0 else v.names[1]} better"
    elif p_equivalent is not None and p_equivalent < ALPHA and v.margin is not None:
        v.says = f"equivalent within ±{v.margin:g}"
    else:
        v.says = INCONCLUSIVE


def _sign(v: Verdict) -> int:
    d = v.diff.mean
    return 0 if d is None or d != d or d == 0 else (1 if d > 0 else -1)


def _decide_ops(v: Verdict, p: float | None, p_equivalent: float | None) -> None:
    sup, enh = v.ops["suppress"], v.ops["enhance"]
    s, e = _sign(sup), _sign(enh)
    if p is not None and p < ALPHA and s == e != 0:
        v.says = f"{v.names[0] if s > 0 else v.names[1]} better"
        return
    ps = [x.p_holm if x.p_holm is not None else x.p for x in (sup, enh)]
    if s == -e != 0 and all(q is not None and q < ALPHA for q in ps):
        fav = lambda sign: v.names[0] if sign > 0 else v.names[1]  # noqa: E731
        v.says = f"disagree (suppress favours {fav(s)}, enhance favours {fav(e)})"
    elif p_equivalent is not None and p_equivalent < ALPHA and v.margin is not None:
        v.says = f"equivalent within ±{v.margin:g}"
    else:
        v.says = INCONCLUSIVE


def _verdict(t: Test, names: Sequence[str], p_equivalent: float | None, margin: float | None) -> Verdict:
    v = Verdict(t.interval, t.p, list(names), p_equivalent=p_equivalent, margin=margin)
    decide(v, t.p, p_equivalent)
    return v


def paired_verdict(a: Sequence[float], b: Sequence[float], clusters: Sequence[str], names: Sequence[str] = ("features", "neurons"),
                   margin: float | None = None) -> Verdict:
    """``a`` vs ``b`` on the same facts (higher is better), CR2 over clusters (relations); equivalence by TOST within
    ±``margin`` when one is given."""
    d = [x - y for x, y in zip(a, b)]
    return _verdict(cluster_robust(d, clusters), names, equivalence_p(d, clusters, margin) if margin else None, margin)


def unpaired_verdict(a: Sequence[float], b: Sequence[float], names: Sequence[str] = ("features", "neurons"),
                     margin: float | None = None) -> Verdict:
    """``a`` vs ``b`` from independent samples (higher is better): Welch's test, and its TOST within ±``margin``."""
    return _verdict(welch_test(a, b), names, welch_equivalence_p(a, b, margin) if margin else None, margin)


def iut_p(sup: Verdict, enh: Verdict) -> float | None:
    """The intersection-union p of "both ops favour the same side": the larger of the two two-sided p's when their
    differences share a sign (each op's one-sided test at half the level), else 1."""
    if sup.p is None or enh.p is None:
        return None
    s = _sign(sup)
    return max(sup.p, enh.p) if s != 0 and s == _sign(enh) else 1.0


def ops_verdict(a: dict[str, Sequence[float]], b: dict[str, Sequence[float]], clusters: Sequence[str],
                names: Sequence[str] = ("features", "neurons"), margin: float = MARGINS["log"]) -> Verdict:
    """``a`` vs ``b`` on the same facts, suppress and enhance judged apart (``a[op][i]``: fact ``i``'s strength under
    ``op``, higher is better); unadjusted until ``adjust`` runs over its table."""
    ops = {op: paired_verdict(a[op], b[op], clusters, names, margin=margin) for op in OPS}
    both = [0.5 * (a["suppress"][i] - b["suppress"][i] + a["enhance"][i] - b["enhance"][i]) for i in range(len(clusters))]
    eq = [ops[op].p_equivalent for op in OPS]
    v = Verdict(cluster_robust(both, clusters).interval, iut_p(ops["suppress"], ops["enhance"]), list(names),
                p_equivalent=None if None in eq else max(eq), margin=margin, ops=ops)
    decide(v, v.p, v.p_equivalent)
    return v


def _adjust_one(family: list[Verdict]) -> None:
    for v, p, e in zip(family, holm([v.p for v in family]), holm([v.p_equivalent for v in family])):
        v.p_holm, v.p_equivalent_holm = p, e
        decide(v, p, e)


def adjust(family: Iterable[Verdict]) -> None:
    """Holm over one verdict table: each op's verdicts over the table first (a disagreement needs both ops significant
    after it), then the verdicts' own p and TOST p; ``says`` decided on the adjusted ones."""
    family = list(family)
    for op in OPS:
        got = [v.ops[op] for v in family if op in v.ops]
        if got:
            _adjust_one(got)
    _adjust_one(family)
