"""Verdicts: which of two unit kinds moves the answer more (or scores higher), from per-fact or per-unit values.

Paired values (the same facts) are compared by the mean difference with a cluster bootstrap over relations; unpaired
values (e.g. interpretability of distinct units) by Welch's test. Each verdict table is one family: Holm's adjustment
runs over it, and a verdict says "A better" / "B better" only when its adjusted p is below ``ALPHA``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from kscope.stats import Interval, Test, cluster_bootstrap, holm, welch_test

ALPHA = 0.05


@dataclass
class Verdict:
    """``diff``: mean of ``a - b`` with its unadjusted 95 % interval; ``p``: two-sided p of no difference; ``p_holm``:
    adjusted over the verdict's table; ``says``: "<a> better", "<b> better" or "no difference" (on ``p_holm``)."""

    diff: Interval
    p: float | None
    names: list[str] = field(default_factory=lambda: ["features", "neurons"])
    p_holm: float | None = None
    says: str = "no difference"


def _verdict(t: Test, names: Sequence[str]) -> Verdict:
    v = Verdict(t.interval, t.p, list(names))
    decide(v, t.p)
    return v


def decide(v: Verdict, p: float | None) -> None:
    """Set ``v.says`` from ``p`` (after Holm: the adjusted one) and the sign of the mean difference."""
    d = v.diff.mean
    if p is None or d is None or d != d or p >= ALPHA or d == 0:
        v.says = "no difference"
    else:
        v.says = f"{v.names[0] if d > 0 else v.names[1]} better"


def paired_verdict(a: Sequence[float], b: Sequence[float], clusters: Sequence[str], names: Sequence[str] = ("features", "neurons"),
                   n_boot: int = 10_000, seed: int = 0) -> Verdict:
    """``a`` vs ``b`` on the same facts (higher is better), facts of one cluster (relation) resampled together."""
    return _verdict(cluster_bootstrap([x - y for x, y in zip(a, b)], clusters, n_boot, seed), names)


def unpaired_verdict(a: Sequence[float], b: Sequence[float], names: Sequence[str] = ("features", "neurons")) -> Verdict:
    """``a`` vs ``b`` from independent samples (higher is better): Welch's test."""
    return _verdict(welch_test(a, b), names)


def adjust(family: Iterable[Verdict]) -> None:
    """Holm over one verdict table: sets each verdict's ``p_holm`` and decides ``says`` on it."""
    family = list(family)
    for v, p in zip(family, holm([v.p for v in family])):
        v.p_holm = p
        decide(v, p)
