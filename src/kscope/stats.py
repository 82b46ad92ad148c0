"""Pure statistics used by the metrics (no model, no I/O)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats as _st


def relative_change(new: Sequence[float] | np.ndarray, old: Sequence[float] | np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """``(new - old) / old`` elementwise: -1 means the probability was wiped out, +1 doubled."""
    new, old = np.asarray(new, dtype=float), np.asarray(old, dtype=float)
    return (new - old) / np.maximum(old, eps)


def mean_ci(values: Sequence[float], conf: float = 0.95) -> dict:
    """Mean with a Student-t confidence interval: ``{"mean", "lo", "hi", "n"}`` (NaN bounds for n < 2)."""
    x = np.asarray(values, dtype=float)
    n = int(x.size)
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    m = float(x.mean())
    if n < 2:
        return {"mean": m, "lo": math.nan, "hi": math.nan, "n": n}
    half = float(_st.t.ppf(0.5 + conf / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return {"mean": m, "lo": m - half, "hi": m + half, "n": n}
