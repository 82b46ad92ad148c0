"""Erasure metrics (pure): reliability, generalization, locality, perplexity change, exposure."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def erased_fraction(before: Sequence[Sequence[bool]], after: Sequence[Sequence[bool]]) -> float:
    """Of the (fact, prompt) pairs that produced the secret before, the fraction that no longer do.

    Rel uses the edit prompts, Gen the held-out ones. NaN when nothing was produced before.
    """
    was = [(b, a) for bs, as_ in zip(before, after) for b, a in zip(bs, as_) if b]
    if not was:
        return math.nan
    return float(np.mean([not a for _, a in was]))


def unchanged_fraction(before: Sequence, after: Sequence) -> float:
    """Locality: fraction of predictions identical before and after the edit."""
    if len(before) != len(after):
        raise ValueError("before and after differ in length")
    if not before:
        return math.nan
    return float(np.mean([b == a for b, a in zip(before, after)]))


def perplexity(nll_sum: float, n_tokens: int) -> float:
    return float(math.exp(nll_sum / max(n_tokens, 1)))


def relative_ppl_change(before: float, after: float) -> float:
    """``(after - before) / before``."""
    return (after - before) / before


def exposure(secret_nll: float, candidate_nlls: Sequence[float]) -> float:
    """Carlini et al. (2019): ``log2 |R| - log2 rank(secret)`` over the candidate space ``R``
    (``candidate_nlls`` includes every format-matching candidate, the secret among them).
    Max = ``log2 |R|`` when the secret is the most likely candidate; ~1 when it ranks at random."""
    c = np.asarray(candidate_nlls, float)
    rank = 1 + int((c < secret_nll - 1e-9).sum())
    return float(math.log2(len(c)) - math.log2(rank))


def rank_of(secret_nll: float, candidate_nlls: Sequence[float]) -> int:
    """1-based rank of the secret among the candidates (ties counted in its favour)."""
    return 1 + int((np.asarray(candidate_nlls, float) < secret_nll - 1e-9).sum())


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is at least as good as ``b`` on every objective (all to maximise) and better on one."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates (every objective maximised; NaN counts as worst)."""
    clean = [[-math.inf if v is None or v != v else v for v in p] for p in points]
    return [i for i, p in enumerate(clean) if not any(dominates(q, p) for j, q in enumerate(clean) if j != i)]
