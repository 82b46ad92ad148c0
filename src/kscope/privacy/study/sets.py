"""The erase study's sets, from the build's splits: what fits the edit and what scores it, never the same item.

- ``erase``: the forget people's memorised secrets, each with only its key prompts (location, keys, target, REVS and
  DEPN/KN selection see these) and its held-out edit prompt (Rel is scored there, Gen on its held-out phrasings).
- ``keep_fit``: the preserved kept people's secrets without the held-out template (the solver's preserved keys),
  scored only as in-sample.
- ``kept``: the other kept people's secrets (``val`` / ``test``), never preserved; Loc(private) is scored on them.
- ``unrelated``: known facts in three parts, preserved / ``val`` / ``test``; Loc(facts) on the last two.
- ``texts``: held-out texts for perplexity in ``val`` / ``test`` halves.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from kscope.errors import KscopeError
from kscope.facts import Fact
from kscope.privacy.data.dataset import collisions
from kscope.privacy.data.splits import PeopleSplit, halves, held_out_templates, key_facts, thirds
from kscope.privacy.judge.observe import Scored

SCOPE_OF_ROLE = {"forget-val": "val", "forget-test": "test", "keep-preserved": "fit", "keep-val": "val", "keep-test": "test"}


@dataclass
class StudySets:
    erase: list[Fact]  # key facts (only the key prompts), forget-val then forget-test
    held_prompt: list[str]
    erase_scope: list[str]
    keep_fit: list[Fact]
    kept: list[Fact]  # keep-val and keep-test
    kept_scope: list[str]
    unrelated: list[Fact]
    unrelated_scope: list[str]
    texts: list[str]
    text_scope: list[str]

    @property
    def unrelated_fit(self) -> list[Fact]:
        return [f for f, s in zip(self.unrelated, self.unrelated_scope) if s == "fit"]

    def erased(self, scope: str) -> list[Fact]:
        return [f for f, s in zip(self.erase, self.erase_scope) if s == scope]

    def people(self, scope: str) -> list[str]:
        return list(dict.fromkeys(f.subject for f in self.erased(scope)))

    def scored(self) -> Scored:
        return Scored(self.erase, self.held_prompt, self.erase_scope, self.keep_fit + self.kept,
                      ["fit"] * len(self.keep_fit) + self.kept_scope, self.unrelated, self.unrelated_scope, self.texts,
                      self.text_scope)

    def sizes(self) -> dict[str, int]:
        """How many secrets, facts and texts each scored set holds."""
        count = lambda xs, s: sum(x == s for x in xs)  # noqa: E731
        return {"erased val": count(self.erase_scope, "val"), "erased test": count(self.erase_scope, "test"),
                "kept preserved": len(self.keep_fit), "kept val": count(self.kept_scope, "val"),
                "kept test": count(self.kept_scope, "test"), "facts preserved": count(self.unrelated_scope, "fit"),
                "facts val": count(self.unrelated_scope, "val"), "facts test": count(self.unrelated_scope, "test"),
                "texts val": count(self.text_scope, "val"), "texts test": count(self.text_scope, "test")}

    def attack_facts(self, scope: str = "test") -> list[Fact]:
        """``scope``'s erased facts with their held-out edit prompt as their only edit prompt: attacks never read a key
        prompt."""
        return [replace(f, prompts=[p]) for f, p, s in zip(self.erase, self.held_prompt, self.erase_scope) if s == scope]


def study_sets(known: Sequence[Fact], split: PeopleSplit, unrelated: Sequence[Fact], texts: Sequence[str], seed: int) -> StudySets:
    """The sets of one study from the memorised private facts ``known``, the build's people ``split``, known facts and
    held-out texts. Refuses a run where a split is empty or an erased secret equals or contains a kept one."""
    if split is None:
        raise KscopeError("this privacy model has no people split (built by an older kscope); build it again")
    forget = split.facts(known, "forget-val") + split.facts(known, "forget-test")
    templates = held_out_templates([f.relation for f in known])
    keys, held = key_facts(forget, templates)
    scope = [SCOPE_OF_ROLE[split.role_of(f.subject)] for f in forget]
    keep_fit = key_facts(split.facts(known, "keep-preserved"), templates)[0]
    kept = split.facts(known, "keep-val") + split.facts(known, "keep-test")
    for name, got in (("forget-val", "val" in scope), ("forget-test", "test" in scope), ("keep-preserved", bool(keep_fit)),
                      ("keep-test", any(SCOPE_OF_ROLE[split.role_of(f.subject)] == "test" for f in kept))):
        if not got:
            raise KscopeError(f"no memorised secret of a {name} person: the splits need one at least (build with more --people, "
                              "more --epochs or a higher --lr)")
    clash = collisions(forget, keep_fit + kept)
    if clash:
        raise KscopeError(f"erased secret {clash[0][0]} equals or contains kept secret {clash[0][1]}: locality could not hold")
    fit, val, test = thirds(list(unrelated), f"facts:{seed}")
    tval, ttest = halves(list(texts), f"texts:{seed}")
    if not tval or not ttest:
        raise KscopeError(f"{len(texts)} held-out text(s): perplexity needs at least one for validation and one for test")
    return StudySets(keys, held, scope, keep_fit, kept, [SCOPE_OF_ROLE[split.role_of(f.subject)] for f in kept],
                     fit + val + test, ["fit"] * len(fit) + ["val"] * len(val) + ["test"] * len(test),
                     tval + ttest, ["val"] * len(tval) + ["test"] * len(ttest))
