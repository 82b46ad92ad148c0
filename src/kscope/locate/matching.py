"""Matched random controls: units drawn at random among those nearest a top unit in some measure of activity, never a
top unit, never drawn twice. ``compare`` and the sweep match on contribution norm; monosemanticity's null on firing
frequency and magnitude (``analyses.selectivity``)."""

from __future__ import annotations

import random
from typing import Callable, Sequence

import numpy as np
import torch

from kscope.units.base import Units

MATCH_POOL = 5
"""A matched unit is drawn among the active units whose contribution norm is nearest the top unit's (log scale)."""


def draw_nearest(top: Sequence[int], free: np.ndarray, candidates: Callable[[np.ndarray, int], np.ndarray],
                 distance: Callable[[np.ndarray, int], np.ndarray], rng: random.Random, pool: int) -> list[int]:
    """Per unit ``t`` of ``top``, in order: one unit drawn uniformly among the ``pool`` of ``candidates(free, t)`` nearest
    ``t`` by ``distance(cands, t)`` (ties by index), then marked taken in ``free`` (a bool mask, changed in place)."""
    out = []
    for t in top:
        cands = candidates(free, t)
        near = cands[np.lexsort((cands, distance(cands, t)))[:pool]]
        pick = int(near[rng.randrange(len(near))])
        free[pick] = False
        out.append(pick)
    return out


def contribution_norms(acts: torch.Tensor, units: Units) -> np.ndarray:
    """``[n_units]``: mean over prompts of ``|activation - centre| x direction norm``, the size of the unit's suppression
    (``acts``: ``[n_prompts, n_units]`` at the answer-reading position); 0 means suppressing it there changes nothing."""
    a = acts.float()
    return ((a - units.centre(a)).abs() * units.direction_norms()[None]).mean(0).numpy()


def matched_units(top: Sequence[int], norms: np.ndarray, rng: random.Random, pool: int = MATCH_POOL) -> list[int]:
    """Per top unit, in order: a unit drawn among the ``pool`` active units (norm > 0) nearest it in log contribution
    norm; never a top unit, never drawn twice. Silent units are taken only once no active one is left (and, in a set
    too small for that, units drawn before)."""
    not_top = np.ones(len(norms), dtype=bool)
    not_top[list(top)] = False
    logn = np.log(np.maximum(norms, 1e-30))

    def candidates(free: np.ndarray, t: int) -> np.ndarray:
        return next(c for c in (np.flatnonzero(m) for m in (free & (norms > 0), free, not_top, np.ones_like(free))) if c.size)

    return draw_nearest(top, not_top.copy(), candidates, lambda c, t: np.abs(logn[c] - logn[t]), rng, pool)
