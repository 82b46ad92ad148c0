"""Pure statistics used by the metrics (no model, no I/O)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats as _st


@dataclass
class Interval:
    """A mean with its 95 % Student-t interval over ``n`` values (``lo``/``hi`` are None for n < 2)."""

    mean: float | None
    lo: float | None = None
    hi: float | None = None
    n: int = 0

    def fmt(self, spec: str = "+.3f") -> str:
        """``+0.123 [+0.100, +0.146]``; the mean alone for n < 2; a dash when empty."""
        if self.mean is None or self.mean != self.mean:
            return "–"
        if self.lo is None or self.lo != self.lo:
            return format(self.mean, spec)
        return f"{format(self.mean, spec)} [{format(self.lo, spec)}, {format(self.hi, spec)}]"


def relative_change(new: Sequence[float] | np.ndarray, old: Sequence[float] | np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """``(new - old) / old`` elementwise: -1 means the probability was wiped out, +1 doubled."""
    new, old = np.asarray(new, dtype=float), np.asarray(old, dtype=float)
    return (new - old) / np.maximum(old, eps)


def mean_ci(values: Sequence[float], conf: float = 0.95) -> Interval:
    """Mean with a Student-t confidence interval (no bounds for n < 2)."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    n = int(x.size)
    if n == 0:
        return Interval(None, None, None, 0)
    m = float(x.mean())
    if n < 2:
        return Interval(m, None, None, n)
    half = float(_st.t.ppf(0.5 + conf / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Interval(m, m - half, m + half, n)


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired comparison of ``a`` and ``b`` (same facts): the mean difference ``a - b`` with its interval,
    the two-sided paired t-test and Wilcoxon signed-rank p-values."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = ~(np.isnan(a) | np.isnan(b))
    d = a[ok] - b[ok]
    out = {"diff": mean_ci(d), "t_p": math.nan, "wilcoxon_p": math.nan}
    if d.size >= 2 and np.any(d != 0):
        out["t_p"] = float(_st.ttest_1samp(d, 0.0).pvalue)
        out["wilcoxon_p"] = float(_st.wilcoxon(d).pvalue)
    return out
