"""How unit sets are edited (one rule for all) and which other facts measure an edit's collateral.

Every set's edit scales each unit's distance from its centre (``Units.scaled``): with ``--ablate-to mean`` (the default)
the centre is the unit's mean code over the corpus, so suppressing a unit moves it to its mean and suppressing every unit
leaves the site at (about) its mean, for the basis, PCA, random directions, neurons and SAE features alike; with
``--ablate-to zero`` every set's codes are zeroed (the basis, neurons and features then move to 0, PCA and random
directions, whose codes are centred, still to the mean).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

from kscope.config import Config, option
from kscope.facts import Fact

ABLATE_TO = ("mean", "zero")


@dataclass
class EditConfig(Config):
    """The centre of every set's edits and the collateral panel."""

    ablate_to: str = option("mean", "Where suppression moves a unit, for every unit set at once: 'mean' (its mean code over "
                                    "the corpus's training texts, --baseline-fit-tokens tokens) or 'zero' (its code zeroed).",
                            choices=ABLATE_TO)
    collateral: int = option(4, "Other facts (of other relations, one measurement prompt each) every top-k edit is also "
                                "measured on: its collateral log P'/P; 0: none.", min=0, max=32, flag="collateral-facts")


def _rank(seed: int, fact: Fact, other: Fact) -> str:
    return hashlib.sha256(f"{seed}:{fact.uid}:{other.uid}".encode()).hexdigest()


def collateral_panel(fact: Fact, pool: Sequence[Fact], n: int, seed: int = 0) -> list[Fact]:
    """Up to ``n`` facts of ``pool`` for measuring ``fact``'s edits on: never the fact itself, its relation, subject or
    answer; one relation at a time (round-robin, so the panel spans relations), each relation's facts and the relations
    ordered by a seeded hash of the two facts' uids, so the panel depends on neither order nor workers. Each keeps its
    first prompt only."""
    cands = [f for f in pool if f.uid != fact.uid and f.relation != fact.relation and f.subject != fact.subject
             and f.object != fact.object and (f.target_id is None or f.target_id != fact.target_id)]
    by_rel: dict[str, list[Fact]] = {}
    for f in sorted(cands, key=lambda f: _rank(seed, fact, f)):
        by_rel.setdefault(f.relation, []).append(f)
    out: list[Fact] = []
    while len(out) < n and any(by_rel.values()):
        for rel in list(by_rel):
            if by_rel[rel] and len(out) < n:
                out.append(by_rel[rel].pop(0))
    return [f.with_prompts(f.prompts[:1]) for f in out]
