"""Paraphrase families of a relation's templates, and which side of the held-out split each family is on.

Two templates are near-duplicates when they have the same content words in the same order (function words,
inflection and punctuation aside: "[X] is originally from" / "[X] was originally from"), or when one adds a single
content word to the other and their token sequences are within a normalised indel distance of 0.2 ("The capital of
[X] is" / "The capital city of [X] is", "[X] is in" / "[X] is located in"). A family is a connected component of
that relation, so no two templates in different families are near-duplicates. A different content word in the
same frame ("[X] is named after" / "[X] is called after") is a lexical paraphrase and starts a new family.

Families go to the selection or the measurement side whole, largest first, each to the side with fewer templates
so far (ties: selection), so that no template of a family that selected units is ever measured.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Sequence

RULE = "kscope.facts.families/1"  # bump when the rule below changes (the committed files record it)
MAX_DISTANCE = 0.2  # normalised indel distance for a template that adds one content word
SIDES = ("select", "measure")
FAMILY_DIR = Path(__file__).resolve().parents[1] / "data" / "template_families"

# Articles and determiners, pronouns, auxiliaries and modals ("used" as in "used to"), relative pronouns, prepositions.
FUNCTION_WORDS = frozenset("""
a an the this that these those its their his her it they he she
is was are were be been being am has have had do does did
can could may might will would shall should must used
who whom whose which
of in at on for from to by with as after into onto about over under than
""".split())
_SUFFIXES = ("ing", "ed", "es", "s", "e")
_TOKEN = re.compile(r"\[x\]|'s\b|\w+|[^\w\s]")


def _stem(word: str) -> str:
    """A crude suffix strip, enough to match "originated" / "originates" and "headquarters" / "headquartered"."""
    for s in _SUFFIXES:
        if word.endswith(s) and len(word) - len(s) >= 3 and word[: -len(s)] not in FUNCTION_WORDS:
            return word[: -len(s)]
    return word


def tokens(template: str) -> list[str]:
    """Lower-cased tokens of a template: ``[x]``, words (content words stemmed), ``'s`` and punctuation."""
    out = []
    for w in _TOKEN.findall(template.lower()):
        out.append(_stem(w) if w[0].isalnum() and w not in FUNCTION_WORDS else w)
    return out


def content(toks: Sequence[str]) -> tuple[str, ...]:
    """The content tokens, in order: the subject slot ``[x]`` and every word that is not a function word."""
    return tuple(w for w in toks if w == "[x]" or (w[0].isalnum() and w not in FUNCTION_WORDS))


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev, row = row, [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
    return row[-1]


def indel_distance(a: Sequence[str], b: Sequence[str]) -> float:
    """Insertions and deletions that turn ``a`` into ``b``, over ``len(a) + len(b)`` (0: equal, 1: nothing shared)."""
    return 1 - 2 * _lcs(a, b) / (len(a) + len(b)) if a or b else 0.0


def near_duplicate(a: str, b: str) -> bool:
    """Are templates ``a`` and ``b`` the same wording up to function words, inflection and punctuation, or one with a
    single content word added within a normalised indel distance of ``MAX_DISTANCE``?"""
    ta, tb = tokens(a), tokens(b)
    ca, cb = content(ta), content(tb)
    if ca == cb:
        return True
    short, long_ = sorted((ca, cb), key=len)
    added_one = len(long_) == len(short) + 1 and _lcs(short, long_) == len(short)
    return added_one and indel_distance(ta, tb) <= MAX_DISTANCE


def group_templates(templates: Sequence[str]) -> list[list[int]]:
    """Template indices grouped into families (connected components of ``near_duplicate``), each family sorted,
    the families in order of their first template."""
    parent = list(range(len(templates)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(templates)):
        for j in range(i + 1, len(templates)):
            ri, rj = root(i), root(j)
            if ri != rj and near_duplicate(templates[i], templates[j]):
                parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(len(templates)):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


@lru_cache(maxsize=256)
def _sides(family_of: tuple[int, ...]) -> tuple[str, ...]:
    sizes = [family_of.count(k) for k in range(max(family_of, default=-1) + 1)]
    out, total = [""] * len(sizes), [0, 0]
    for k in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
        side = 0 if total[0] <= total[1] else 1
        out[k], total[side] = SIDES[side], total[side] + sizes[k]
    return tuple(out)


def family_sides(family_of: Sequence[int]) -> list[str]:
    """``"select"`` or ``"measure"`` for each family (ids 0..k-1; ``family_of`` is the family of each template):
    largest family first, each to the side with fewer templates so far, ties to selection. Singleton families
    alternate (0, 2, ... select), the template-parity split."""
    return list(_sides(tuple(family_of)))


@dataclass(frozen=True)
class TemplateFamilies:
    """A relation's usable templates (prompts with ``[X]``), their families and each family's side."""

    relation: str
    templates: tuple[str, ...]
    families: tuple[tuple[int, ...], ...]
    rule: str = RULE

    @property
    def sides(self) -> tuple[str, ...]:
        """Each family's side (``family_sides``): written to the JSON for a reader, never read back."""
        return tuple(family_sides(self.family_of()))

    def family_of(self) -> list[int]:
        """The family of each template."""
        out = [0] * len(self.templates)
        for k, members in enumerate(self.families):
            for t in members:
                out[t] = k
        return out

    def to_json(self) -> str:
        """JSON with a template a line and the families (template indices) and their sides on one line each."""
        dump = lambda x: json.dumps(x, ensure_ascii=False)  # noqa: E731
        templates = ",\n".join(f"  {dump(t)}" for t in self.templates)
        return (f'{{\n "relation": {dump(self.relation)},\n "rule": {dump(self.rule)},\n "templates": [\n{templates}\n ],\n'
                f' "families": {dump([list(f) for f in self.families])},\n "sides": {dump(list(self.sides))}\n}}\n')

    @classmethod
    def from_json(cls, text: str) -> "TemplateFamilies":
        d = json.loads(text)
        return cls(d["relation"], tuple(d["templates"]), tuple(tuple(f) for f in d["families"]), d["rule"])


def compute_families(relation: str, templates: Sequence[str]) -> TemplateFamilies:
    """The families and sides the rule gives ``templates`` (the relation's usable templates, in file order)."""
    return TemplateFamilies(relation, tuple(templates), tuple(tuple(g) for g in group_templates(templates)))


def committed_families(relation: str) -> TemplateFamilies | None:
    """The families shipped in ``kscope/data/template_families/<relation>.json``, if there is such a file."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", relation):
        return None
    f = resources.files("kscope.data").joinpath("template_families").joinpath(f"{relation}.json")
    return TemplateFamilies.from_json(f.read_text(encoding="utf-8")) if f.is_file() else None


def template_families(relation: str, templates: Sequence[str]) -> TemplateFamilies:
    """The relation's families: the committed file when it was made by this rule for these very templates, else
    computed (a relation the project has not seen, or another ParaRel version)."""
    shipped = committed_families(relation)
    if shipped is not None and shipped.rule == RULE and shipped.templates == tuple(templates):
        return shipped
    return compute_families(relation, templates)
