"""ΔProb: how much the answer's probability moves when a fact's top-k units are suppressed or enhanced."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kscope.config import MAX_DRAWS, Config, option
from kscope.facts import Fact
from kscope.errors import KscopeError
from kscope.model.readout import fact_probs
from kscope.stats import mean_ci, relative_change
from kscope.units.base import Units


@dataclass
class DeltaProbConfig(Config):
    """Which interventions on the top units to measure."""

    ks: list[int] = option(help="Numbers of top units to intervene on.", factory=lambda: [1, 5, 10], min=1, unique=True)
    ops: list[str] = option(help="suppress (to the unit's centre: its mean, or 0 under --ablate-to zero) and/or enhance (x2 its distance from it).", factory=lambda: ["suppress", "enhance"], choices=("suppress", "enhance"), label="op", unique=True)
    positions: str = option("last", "Intervene at the 'last' token (as attributed) or at 'all' tokens.", choices=("last", "all"))
    random_draws: int = option(1, "Random unit sets of each size per fact and unit kind, measured the same way (the control); 0: none.",
                               min=0, max=MAX_DRAWS)
    matched_draws: int = option(1, "Matched random unit sets per fact and unit kind: units active at the answer-reading position, "
                                   "each drawn among the 5 nearest a top unit in contribution norm (|activation| x direction "
                                   "norm); 0: none.", min=0, max=MAX_DRAWS)
    seed: int = option(0, "Seed of the random unit sets (drawn per fact, so results do not depend on order or workers).",
                       flag="random-seed")


def fact_delta_prob(lm, fact: Fact, units: Units, top: Sequence[int], cfg: DeltaProbConfig, p_clean: Sequence[float] | None = None) -> dict:
    """Mean relative change of ``P(answer)`` over the fact's prompts, ``{op: {k: value}}`` (whole-answer
    facts: of the answer's teacher-forced probability)."""
    if p_clean is None:
        p_clean, _ = fact_probs(lm.model, lm.tokenizer, fact)
    out: dict = {}
    for op in cfg.ops:
        out[op] = {}
        for k in cfg.ks:
            idx = list(top[:k])
            if len(idx) < k:
                raise KscopeError(f"ΔProb at k={k} needs {k} ranked units, only {len(idx)} were ranked")
            units.check_index(idx)
            edits = {units.site: units.edit_fn(units.op(op, idx))}
            p_new, _ = fact_probs(lm.model, lm.tokenizer, fact, edits=edits, positions=cfg.positions)
            out[op][k] = float(relative_change(p_new.numpy(), np.asarray(p_clean)).mean())
    return out


def aggregate(per_fact: Sequence[dict]) -> dict:
    """``{op: {k: mean_ci}}`` over facts of ``fact_delta_prob`` outputs."""
    if not per_fact:
        return {}
    agg: dict = {}
    for op, by_k in per_fact[0].items():
        agg[op] = {k: mean_ci([f[op][k] for f in per_fact]) for k in by_k}
    return agg
