"""Where facts come from (the built-in set, a ParaRel directory, a JSONL file), the config that names them, and the
clean-up every source gets (repeats, and prompts that already end with the answer, left out)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

from kscope.config import Config, option
from kscope.errors import KscopeError
from kscope.facts.fact import Fact, left_out, read_jsonl
from kscope.facts.pararel import load_pararel


@dataclass
class FactConfig(Config):
    """Which facts to use and how to filter them."""

    facts: str | None = option(None, "ParaRel directory or .jsonl fact file; default: the built-in set.", reads=True)
    relations: list[str] | None = option(None, "ParaRel relation ids to keep (e.g. P36,P103); ParaRel only.", flag="relation-ids")
    max_facts: int | None = option(None, "Keep at most this many known facts.", min=1)
    max_per_relation: int = option(50, "ParaRel facts sampled per relation before filtering.", min=1)
    max_prompts: int = option(8, "At most this many paraphrases per fact (taken from the two sides of the held-out split in turn).", min=1)
    known_top_k: int = option(1, "A prompt is known if the answer token is within the top k.", min=1)
    min_known_prompts: int = option(2, "Keep a fact if at least this many of its prompts are known (paraphrases are needed for refinement).", min=1)
    multi_token: str = option("first", "Objects of several tokens: 'first' (score the first token), 'whole' (score the log-probability "
                              "of all its tokens, teacher-forced), 'skip' or 'error'.",
                              choices=("first", "whole", "skip", "error"), label="multi-token policy")
    answer_tokens: str = option("all", "With --multi-token whole: score 'all' answer tokens, or only the 'distinct' ones after "
                                "the prefix that every object of the relation shares.", choices=("all", "distinct"))
    seed: int = option(0, "Sampling seed.")

    def load(self) -> list[Fact]:
        """The facts this config names, before the known filter."""
        return load_facts(self.facts, self.relations, self.max_per_relation, self.seed)


def load_fact_file(path: str | Path) -> list[Fact]:
    """Facts from JSONL: ``{"subject", "relation", "object", "prompts": [...], "heldout_prompts"?: [...]}``."""
    path = Path(path)
    if not path.exists():
        raise KscopeError(f"fact file {path} does not exist")
    facts = []
    for i, row in enumerate(read_jsonl(path), 1):
        missing = [k for k in ("subject", "relation", "object", "prompts") if k not in row]
        if missing:
            raise KscopeError(f"{path}: fact {i} lacks {', '.join(missing)}")
        for key in ("prompts", "heldout_prompts"):
            value = row.get(key, [])
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise KscopeError(f"{path}: fact {i}: {key!r} must be a list of strings")
        facts.append(
            Fact(
                row["subject"],
                row["relation"],
                row["object"],
                list(row["prompts"]),
                heldout_prompts=list(row.get("heldout_prompts", [])),
                uid=str(row.get("uid", "")),
            )
        )
    if not facts:
        raise KscopeError(f"fact file {path} holds no facts")
    return facts


def write_fact_file(facts: Sequence[Fact], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for fact in facts:
            d = fact.to_dict()
            f.write(json.dumps({k: d[k] for k in ("subject", "relation", "object", "prompts", "heldout_prompts", "uid")}) + "\n")


def builtin_facts() -> list[Fact]:
    """A small fact set the default model knows (capitals, languages, landmarks...)."""
    text = resources.files("kscope.data").joinpath("builtin_facts.jsonl").read_text(encoding="utf-8")
    facts = []
    for row in (json.loads(l) for l in text.splitlines() if l.strip()):
        facts.append(Fact(row["subject"], row["relation"], row["object"], row["prompts"]))
    return facts


def load_facts(source: str | None, relations: Sequence[str] | None = None, max_per_relation: int | None = None, seed: int = 0) -> list[Fact]:
    """Built-in facts (``None``), a ParaRel directory, or a JSONL fact file; ``relations`` keeps those relations
    (ParaRel ids, or the ``relation`` names of a fact file)."""
    if source is None:
        facts = builtin_facts()
    else:
        p = Path(source)
        if p.is_dir():
            facts = load_pararel(p, relations, max_per_relation, seed)
        elif p.is_file():
            facts = load_fact_file(p)
        else:
            raise KscopeError(f"fact source {source} does not exist")
    if relations:
        missing = set(relations) - {f.relation for f in facts}
        if missing:
            have = sorted({f.relation for f in facts})
            raise KscopeError(f"no facts of relation(s) {', '.join(sorted(missing))} in {source or 'the built-in set'} "
                              f"(it has {', '.join(have[:12])}{' ...' if len(have) > 12 else ''})")
        facts = [f for f in facts if f.relation in set(relations)]
    facts = asking(distinct(facts))
    if not facts:
        raise KscopeError("the fact set is empty")
    return facts


def distinct(facts: Sequence[Fact]) -> list[Fact]:
    """``facts`` without repeats (the same uid, or the same subject, relation and object), the first kept; a note names
    those left out. Facts that share only the uid made up for them (one subject and relation, two objects) are both kept,
    the later one with its object added to its uid."""
    seen_uid: set[str] = set()
    seen: set[tuple[str, str, str]] = set()
    out, dropped = [], []
    for f in facts:
        triple = (f.subject.strip(), f.relation.strip(), f.object.strip())
        if f.uid in seen_uid and f.uid == f"{f.relation}:{f.subject}" and triple not in seen:
            f = replace(f, uid=f"{f.uid}:{f.object}")
        if f.uid in seen_uid or triple in seen:
            dropped.append(f.describe())
            continue
        seen_uid.add(f.uid)
        seen.add(triple)
        out.append(f)
    left_out("repeated facts are", dropped)
    return out


def _ends_with(prompt: str, obj: str) -> bool:
    """Does ``prompt`` end with the word(s) ``obj`` (case and a final full stop aside)?"""
    p, o = prompt.rstrip(" .").lower(), obj.strip().lower()
    return p.endswith(o) and (len(p) == len(o) or not p[-len(o) - 1].isalnum())


def prune_prompts(facts: Sequence[Fact], bad: Callable[[Fact, str], bool], what: str) -> list[Fact]:
    """``facts`` without the prompts for which ``bad(fact, prompt)`` holds, and without the facts left with no prompt;
    notes name what was left out."""
    out, dropped, emptied = [], [], []
    for f in facts:
        prompts, held = [p for p in f.prompts if not bad(f, p)], [p for p in f.heldout_prompts if not bad(f, p)]
        dropped += [repr(p) for p in f.prompts + f.heldout_prompts if p not in prompts + held]
        if prompts:
            out.append(replace(f.with_prompts(prompts), heldout_prompts=held))  # template indices kept in step
        else:
            emptied.append(f.describe())
    left_out(f"prompts that {what} are", dropped)
    left_out(f"facts with no prompt left (they {what}) are", emptied)
    return out


def asking(facts: Sequence[Fact]) -> list[Fact]:
    """``facts`` whose prompts ask for the object: a prompt that already ends with it is left out (a fact with none
    left too)."""
    return prune_prompts(facts, lambda f, p: _ends_with(p, f.object), "already end with their object")
