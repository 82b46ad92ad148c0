"""Who and what may fit an erasure, choose its settings, or score it: disjoint splits, fixed when a privacy model is built.

People get one role each (seeded by the build's seed):

- ``forget-val`` / ``forget-test``: their every secret is erased; the retain twin never sees them. Settings (a method's
  best budget and strength) are chosen on the validation people and reported on the test people.
- ``keep-preserved``: kept people whose secrets the solver is told to keep (their key positions are preserved keys).
- ``keep-val`` / ``keep-test``: kept people the solver never sees; locality is scored on them (validation / test).

Edit templates are split too: per attribute one template is held out of every edit (``held_out_templates``): no
erased secret's keys, target or location and no preserved person's keys read it, under any name; Rel is scored on it
(``key_facts``). Known facts and held-out texts are split into preserved / validation / test parts by ``thirds``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Sequence, TypeVar

from kscope.errors import KscopeError
from kscope.facts import Fact

ROLES = ("forget-val", "forget-test", "keep-preserved", "keep-val", "keep-test")
T = TypeVar("T")


@dataclass
class PeopleSplit:
    """Each role's people, in the order the build drew them."""

    roles: dict[str, list[str]] = field(default_factory=dict)

    def people(self, *roles: str) -> list[str]:
        return [p for r in roles for p in self.roles.get(r, [])]

    @property
    def forget(self) -> list[str]:
        return self.people("forget-val", "forget-test")

    def role_of(self, person: str) -> str | None:
        return next((r for r, ps in self.roles.items() if person in ps), None)

    def facts(self, facts: Sequence[Fact], *roles: str) -> list[Fact]:
        """The facts whose subject holds one of ``roles``, in their order."""
        who = set(self.people(*roles))
        return [f for f in facts if f.subject in who]


def split_people(people: Sequence[str], forget: float, seed: int) -> PeopleSplit:
    """Seeded roles: ``forget`` of the people are erased (half validation, half test, test gets the odd one), the rest
    kept (a third preserved, a third validation, a third test; test first, then preserved, gets what the thirds leave).
    Needs at least 4 people: one of each role but ``keep-val``, which may be empty."""
    people = list(people)
    if len(people) < 4:
        raise KscopeError(f"{len(people)} people: the splits need at least 4 (forget-val, forget-test, keep-preserved, keep-test)")
    order = list(people)
    random.Random(f"split:{seed}").shuffle(order)
    n_forget = min(max(2, round(forget * len(order))), len(order) - 2)
    gone, kept = order[:n_forget], order[n_forget:]
    n_val = len(gone) // 2
    k = len(kept)
    n_kval = k // 3
    n_pres = max(1, (k - n_kval) // 2)
    return PeopleSplit({"forget-val": gone[:n_val], "forget-test": gone[n_val:], "keep-preserved": kept[:n_pres],
                        "keep-val": kept[n_pres : n_pres + n_kval], "keep-test": kept[n_pres + n_kval :]})


def held_out_templates(relations: Sequence[str], n_templates: int = 3) -> dict[str, int]:
    """Per relation (attribute), the index of the edit template no edit sees: rotated over the sorted relations, so the
    attributes hold out different templates."""
    return {r: i % n_templates for i, r in enumerate(sorted(set(relations)))}


def key_facts(facts: Sequence[Fact], held: dict[str, int] | None = None) -> tuple[list[Fact], list[str]]:
    """Each fact with only its key prompts (what the edit, location and target see) and its held-out edit prompt (where
    Rel is scored), the template ``held[relation]`` (default: ``held_out_templates`` of these facts). A fact with one
    edit prompt cannot hold one out."""
    held = held if held is not None else held_out_templates([f.relation for f in facts])
    keys, scored = [], []
    for f in facts:
        if len(f.prompts) < 2:
            raise KscopeError(f"{f.describe()}: one edit prompt; an erased secret needs two (one is held out of the edit)")
        h = held[f.relation] % len(f.prompts)
        keys.append(replace(f, prompts=[p for j, p in enumerate(f.prompts) if j != h],
                            templates=None if f.templates is None else [t for j, t in enumerate(f.templates) if j != h]))
        scored.append(f.prompts[h])
    return keys, scored


def thirds(items: Sequence[T], seed: str) -> tuple[list[T], list[T], list[T]]:
    """A seeded split into preserved / validation / test parts (sizes as equal as they go; test gets the remainder)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    a = len(order) // 3
    return order[:a], order[a : 2 * a], order[2 * a :]


def halves(items: Sequence[T], seed: str) -> tuple[list[T], list[T]]:
    """A seeded split into validation / test halves (test gets the odd one)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return order[: len(order) // 2], order[len(order) // 2 :]
