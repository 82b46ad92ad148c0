"""The held-out split: which of a fact's prompts choose its units and which measure them."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain, zip_longest
from typing import Sequence

from kscope.config import option
from kscope.errors import KscopeError
from kscope.facts.fact import Fact
from kscope.facts.families import family_sides
from kscope.progress import note


def holdout_option():
    """The ``--holdout/--no-holdout`` option of every job that chooses units and then measures them."""
    return option(True, "Choose each fact's units on some of its prompts and measure them on the others, so no prompt both "
                        "selects and evaluates (ParaRel: each relation's paraphrase families, templates alike up to "
                        "function words or one added word, are split between selection and measurement for every fact "
                        "of the relation; other facts: even- and odd-numbered paraphrases, which can be near-duplicates); "
                        "--no-holdout: the same prompts do both (in-sample, the paper's protocol). Facts whose prompts fall "
                        "on one side only are left out of a held-out run.")


def _sides(fact: Fact) -> list[int]:
    """0 (select) or 1 (measure) for each prompt: by its template's family, by template parity when the fact knows
    its templates but not their families, else by position."""
    if fact.templates is None:
        return [i % 2 for i in range(len(fact.prompts))]
    if fact.families is None:
        return [t % 2 for t in fact.templates]
    side = family_sides(fact.families)
    return [int(side[fact.families[t]] == "measure") for t in fact.templates]


def _halves(fact: Fact) -> tuple[list[str], list[str]]:
    """Selection and measurement prompts of ``fact``."""
    sides = _sides(fact)
    return ([p for p, s in zip(fact.prompts, sides) if s == 0], [p for p, s in zip(fact.prompts, sides) if s == 1])


def first_prompts(fact: Fact, n: int) -> list[str]:
    """At most ``n`` of the fact's prompts, taken from the two sides of the split in turn (so a cap on the prompts
    scored never leaves a side empty that has prompts), in the fact's order. Alternating paraphrases: the first n."""
    sides = _sides(fact)
    halves = [[i for i, s in enumerate(sides) if s == k] for k in (0, 1)]
    turns = [i for i in chain.from_iterable(zip_longest(*halves)) if i is not None]
    return [fact.prompts[i] for i in sorted(turns[:n])]


def note_single_families(facts: Sequence[Fact]) -> None:
    """A note naming the relations among ``facts`` whose templates form one paraphrase family (nothing to measure on)."""
    single = sorted({f.relation for f in facts if f.families is not None and len(set(f.families)) == 1})
    if single:
        note(f"{len(single)} relations have a single paraphrase family, so no held-out family to measure on; their facts "
             f"are left out (--holdout): {', '.join(single)}")


def splittable(facts: Sequence[Fact]) -> list[Fact]:
    """The facts a held-out split can use (a prompt on each side); says how many are left out, refuses if none is left."""
    kept = [f for f in facts if all(_halves(f))]
    note_single_families(facts)
    if not kept:
        raise KscopeError("no fact has prompts on both sides of the held-out split; use --no-holdout or more paraphrases")
    if len(kept) < len(facts):
        note(f"{len(facts) - len(kept)} facts with prompts on one side of the split only are left out (--holdout)")
    return kept


def split_prompts(fact: Fact, holdout: bool) -> tuple[Fact, Fact]:
    """``(select, measure)`` views of a fact; without ``holdout`` both are the whole fact. A ParaRel fact is split by
    paraphrase family: the families of its relation on the selection side select and the others measure, so no
    template that chose any fact's units of the relation, nor a near-duplicate of one, is ever measured. Other facts
    alternate their own paraphrases (0, 2, ... select)."""
    if not holdout:
        return fact, fact
    sel, meas = _halves(fact)
    if not sel or not meas:
        raise KscopeError(f"fact {fact.uid}: a held-out split needs prompts on both sides, it has {len(sel)} and {len(meas)}")
    return fact.with_prompts(sel), fact.with_prompts(meas)


@dataclass
class FamilySplit:
    """How a family split went over some facts: how many keep a known prompt (so at least one family) on each side,
    and the families and templates on each side over their relations."""

    n_facts: int
    n_both_sides: int
    n_relations: int  # relations of the facts that keep both sides
    select_families: int
    measure_families: int
    select_templates: int
    measure_templates: int


def family_split(facts: Sequence[Fact]) -> FamilySplit:
    """``FamilySplit`` of the facts that carry template families (ParaRel)."""
    facts = [f for f in facts if f.families is not None]
    both = [f for f in facts if all(_halves(f))]
    by_rel = {f.relation: f.families for f in both}
    count = {"select": [0, 0], "measure": [0, 0]}  # families, templates
    for fam in by_rel.values():
        for k, side in enumerate(family_sides(fam)):
            count[side][0] += 1
            count[side][1] += fam.count(k)
    return FamilySplit(len(facts), len(both), len(by_rel), count["select"][0], count["measure"][0], count["select"][1],
                       count["measure"][1])


def split_kind(facts: Sequence[Fact], holdout: bool) -> str:
    """How the facts' prompts were split, for results and report titles; a family split says how many facts keep a
    paraphrase family on each side."""
    if not holdout:
        return "in-sample (the same prompts select and measure)"
    if facts and all(f.families is not None for f in facts):
        s = family_split(facts)
        of = f" of {s.n_facts}" if s.n_both_sides < s.n_facts else ""
        return (f"family-disjoint (a relation's paraphrase families, templates alike up to function words or one added "
                f"word, select or measure, never both; {s.n_both_sides}{of} facts from {s.n_relations} relations keep >= 1 "
                f"family on each side; {s.select_families} families / {s.select_templates} templates select, "
                f"{s.measure_families} / {s.measure_templates} measure)")
    if facts and all(f.templates is not None for f in facts):
        return "template-disjoint (a relation's even templates select, its odd templates measure; they can be near-duplicates)"
    return "paraphrase alternation (selection and measurement prompts can be near-duplicates)"
