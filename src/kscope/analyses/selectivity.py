"""The controls of the monosemanticity test (pure, no model): unrelated prompts that differ from a fact's own only in
the subject, and the null of activity-matched random units.

- **Unrelated prompts** are the fact's measured prompts with its subject replaced by the subject of another fact of the
  same relation (with another object): the same relation, template and final token, so AUROC cannot reward a unit for
  telling one relation or one last token from another, only for the fact's subject.
- **The null** is the AUROC of random units of the same set, each matched to a top unit on its activity over the job's
  prompts (how often it is non-zero and its mean |activation|, as quantiles within the set), scored on the same fact,
  prompts and orientation rule; several draws.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.stats import rankdata

from kscope.facts import Fact
from kscope.locate.matching import draw_nearest

MATCH_POOL = 10
"""A matched unit is drawn among this many units of the set nearest the top unit in activity."""


def swap_subject(prompt: str, subject: str, other: str) -> str:
    """``prompt`` with every occurrence of ``subject`` replaced by ``other``."""
    return prompt.replace(subject, other)


def same_template_unrelated(fact: Fact, facts: Sequence[Fact], n: int, rng: random.Random) -> list[str]:
    """Up to ``n`` prompts drawn from ``fact``'s own prompts with its subject replaced by the subject of another fact in
    ``facts`` of the same relation and another object (prompts that do not contain the subject are not used)."""
    others = sorted({g.subject for g in facts if g.relation == fact.relation and g.subject != fact.subject
                     and g.object != fact.object})
    cands = [swap_subject(p, fact.subject, o) for p in fact.prompts if fact.subject in p for o in others]
    cands = [c for c in dict.fromkeys(cands) if c not in fact.prompts]
    return rng.sample(cands, min(n, len(cands)))


def activity(acts: np.ndarray) -> np.ndarray:
    """``[n_units, 2]``: each unit's firing frequency (share of non-zero activations) and mean |activation| over the
    prompts ``acts`` ``[n_prompts, n_units]``, as quantiles within the set (ranks / n_units; ties share a rank)."""
    a = np.abs(np.asarray(acts, float))
    n = a.shape[1]
    return np.stack([rankdata((a > 0).mean(0)) / n, rankdata(a.mean(0)) / n], axis=1)


def matched_units(top: Sequence[int], stats: np.ndarray, rng: random.Random, exclude: Sequence[int] = (),
                  pool: int = MATCH_POOL) -> list[int]:
    """Per unit of ``top``, in order: a unit drawn among the ``pool`` units nearest it in ``activity`` space, never one of
    ``top`` or ``exclude`` and never drawn twice (in a set too small for that, any other unit)."""
    free = np.ones(len(stats), dtype=bool)
    free[list(top)] = False
    free[list(exclude)] = False

    def candidates(free: np.ndarray, t: int) -> np.ndarray:
        cands = np.flatnonzero(free)
        return cands if cands.size else np.flatnonzero(np.arange(len(stats)) != t)

    return draw_nearest(top, free, candidates, lambda c, t: np.hypot(*(stats[c] - stats[t]).T), rng, pool)


@dataclass
class NullSummary:
    """The mean AUROC of the matched random units: its mean over draws and the 2.5-97.5 % range of the draws."""

    mean: float
    lo: float
    hi: float
    draws: int


def null_summary(null: np.ndarray) -> NullSummary | None:
    """From ``[n_rows, n_draws]`` AUROCs of the rows' matched units: each draw's mean over rows, summarised."""
    null = np.asarray(null, float)
    if null.size == 0:
        return None
    per_draw = np.nanmean(null, axis=0)
    return NullSummary(float(per_draw.mean()), float(np.percentile(per_draw, 2.5)), float(np.percentile(per_draw, 97.5)),
                       int(null.shape[1]))
