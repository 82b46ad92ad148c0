"""Which neurons or features to edit: DEPN's aggregate over all prompts, and Dai et al.'s per-fact refined sets."""

from __future__ import annotations

from typing import Sequence

import torch

from kscope.locate.attribution import coarse_select, rank_units, refine_select


def depn_select(scores: torch.Tensor, threshold: float, n: int) -> list[int]:
    """DEPN aggregator: units selected (>= t x max) on the most prompts, ties by mean score; top ``n``."""
    sel = coarse_select(scores, threshold).float()
    freq, mean = sel.mean(0), scores.mean(0)
    order = sorted(range(scores.shape[1]), key=lambda i: (-float(freq[i]), -float(mean[i])))
    return [i for i in order if freq[i] > 0][:n] or order[:n]

def kn_select(scores: torch.Tensor, owner: Sequence[int], n: int, t: float = 0.2, p: float = 0.5) -> list[int]:
    """Dai et al.: refined neurons of each fact (coarse t, shared by >= p of its prompts), pooled and
    ranked by mean score; filled up to ``n`` with each fact's next-best units."""
    owner_t = torch.as_tensor(owner)
    per_fact = []
    for i in sorted(set(owner)):
        s = scores[owner_t == i]
        per_fact.append(rank_units(s, refine_select(coarse_select(s, t), p), n))
    out: list[int] = []
    for depth in range(n):
        for ranked in per_fact:
            if depth < len(ranked) and ranked[depth] not in out:
                out.append(ranked[depth])
    return out[:n]
