"""Answer tokens of each fact and the "does the model know it" filter."""

from __future__ import annotations

import random
from typing import Sequence

from kscope.errors import KscopeError
from kscope.facts.fact import Fact, left_out
from kscope.facts.sources import FactConfig, prune_prompts
from kscope.facts.split import _halves, first_prompts, note_single_families
from kscope.progress import note


def shared_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix shared by all ``rows``, leaving each at least one token."""
    n = min(len(r) for r in rows) - 1
    for i in range(max(n, 0)):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return max(n, 0)


def answer_token(tokenizer, obj: str) -> tuple[int, bool]:
    """First token of ``" " + obj`` and whether the object spans more than one token."""
    ids = tokenizer(" " + obj.strip(), add_special_tokens=False).input_ids
    if not ids:
        raise KscopeError(f"object {obj!r} tokenizes to nothing")
    return ids[0], len(ids) > 1


def _too_long(tokenizer, prompt: str, n_answer: int, context: int) -> bool:
    """Does ``prompt`` followed by ``n_answer`` answer tokens overflow ``context`` tokens?"""
    if len(prompt.encode()) + 2 + n_answer <= context:  # a token holds at least a byte; 2 for BOS/EOS
        return False
    return len(tokenizer(prompt).input_ids) + n_answer > context


def resolve_targets(facts: Sequence[Fact], tokenizer, multi_token: str = "first", answer_tokens: str = "all",
                    context: int | None = None) -> list[Fact]:
    """Set each fact's answer tokens; handle multi-token objects per ``multi_token``.

    ``whole`` scores every token of the object (``answer_tokens="distinct"``: only those after the
    token prefix shared by all objects of the fact's relation in ``facts``). A fact whose object holds the
    tokenizer's unknown token is left out (the answer would be scored as that token), and so is a prompt that with
    its answer does not fit in ``context`` tokens (and a fact with no prompt left), each with a note.
    """
    if multi_token not in ("first", "whole", "skip", "error"):
        raise KscopeError(f"multi_token must be first, whole, skip or error, not {multi_token!r}")
    out = []
    tokens = {f.uid: tokenizer(" " + f.object.strip(), add_special_tokens=False).input_ids for f in facts}
    unk = tokenizer.unk_token_id
    unknown = [f for f in facts if unk is not None and unk in tokens[f.uid]]
    left_out(f"facts whose object holds the unknown token {tokenizer.unk_token!r} are", [f.describe() for f in unknown])
    facts = [f for f in facts if f not in unknown]
    if context:
        facts = prune_prompts(facts, lambda f, p: _too_long(tokenizer, p, len(tokens[f.uid]), context),
                               f"do not fit the model's context of {context} tokens with their answer")
    shared: dict[str, int] = {}
    if multi_token == "whole" and answer_tokens == "distinct":
        by_rel: dict[str, list[list[int]]] = {}
        for f in facts:
            by_rel.setdefault(f.relation, []).append(tokens[f.uid])
        shared = {r: shared_prefix(rows) if len(rows) > 1 else 0 for r, rows in by_rel.items()}
    skipped = []
    for f in facts:
        ids = tokens[f.uid]
        if not ids:
            raise KscopeError(f"object {f.object!r} of fact {f.uid} tokenizes to nothing")
        multi = len(ids) > 1
        if multi and multi_token == "error":
            raise KscopeError(f"target {f.object!r} of fact {f.uid} is not one token ({len(ids)} tokens)")
        if multi and multi_token == "skip":
            skipped.append(f.describe())
            continue
        f.target_id, f.multi_token = ids[0], multi
        if multi_token == "whole":
            f.target_tokens, f.score_from = list(ids), shared.get(f.relation, 0)
        out.append(f)
    left_out("facts whose object is several tokens are (--multi-token skip)", skipped)
    return out


def _ranks(lm, part: Sequence[Fact], cfg: FactConfig, batch_size: int) -> list[tuple[int, str, int]]:
    """``(fact index, prompt, rank)`` for up to ``max_prompts`` prompts of each fact in ``part`` (drawn from both
    sides of the held-out split in turn: ``first_prompts``); the rank of the answer's first token, or for whole-answer
    facts the worst rank of its tokens."""
    from kscope.model.readout import answer_logprobs, answer_probs

    if cfg.multi_token == "whole":
        out = []
        for i, f in enumerate(part):
            prompts = first_prompts(f, cfg.max_prompts)
            _, worst = answer_logprobs(lm.model, lm.tokenizer, prompts, f.target_tokens, f.score_from, batch_size=batch_size)
            out += [(i, p, int(r)) for p, r in zip(prompts, worst.tolist())]
        return out
    pairs = [(i, p) for i, f in enumerate(part) for p in first_prompts(f, cfg.max_prompts)]
    order = sorted(range(len(pairs)), key=lambda j: len(pairs[j][1]))  # less padding
    _, ranks = answer_probs(lm.model, lm.tokenizer, [pairs[j][1] for j in order], [part[pairs[j][0]].target_id for j in order],
                            batch_size=batch_size)
    out = [None] * len(pairs)
    for j, r in zip(order, ranks.tolist()):
        out[j] = (*pairs[j], int(r))
    return out


def context_length(model) -> int | None:
    """The most positions ``model`` takes (None when its config does not say)."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def filter_known(lm, facts: Sequence[Fact], cfg: FactConfig, batch_size: int = 64, chunk: int = 128, progress=None,
                 holdout: bool = False, why: dict[str, int] | None = None) -> list[Fact]:
    """Keep facts the model knows: the answer is in the top ``known_top_k`` on at least
    ``min_known_prompts`` prompts (with ``holdout``, known prompts on both sides of the held-out split too).
    Unknown prompts are dropped from kept facts. ``why`` counts the facts left out: ``"unknown"`` (too few known
    prompts), ``"one side"`` (known, but not on both sides of the held-out split).

    With ``max_facts``, facts are visited in a seeded random order (so relations mix) and scoring
    stops once enough are kept.
    """
    facts = resolve_targets(facts, lm.tokenizer, cfg.multi_token, cfg.answer_tokens, context_length(lm.model))
    if cfg.max_facts is not None:
        facts = random.Random(cfg.seed).sample(facts, len(facts))
    task = progress.add_task("known facts", total=len(facts)) if progress is not None else None
    kept: list[Fact] = []
    for start in range(0, len(facts), chunk):
        part = facts[start : start + chunk]
        known: dict[int, list[str]] = {}
        for i, p, r in _ranks(lm, part, cfg, batch_size):
            if r < cfg.known_top_k:
                known.setdefault(i, []).append(p)
        for i, f in enumerate(part):
            ok = known.get(i, [])
            if len(ok) >= cfg.min_known_prompts and (not holdout or all(_halves(f.with_prompts(ok)))):
                kept.append(f.with_prompts(ok))
            elif why is not None:
                reason = "unknown" if len(ok) < cfg.min_known_prompts else "one side"
                why[reason] = why.get(reason, 0) + 1
            if cfg.max_facts is not None and len(kept) >= cfg.max_facts:
                return kept
        if task is not None:
            progress.advance(task, len(part))
    return kept


def prepare_facts(lm, cfg: FactConfig, facts: list[Fact] | None = None, progress=None,
                  holdout: bool = False) -> tuple[list[Fact], list[Fact]]:
    """Load (unless given), resolve and filter facts (``holdout``: only facts a held-out split can use count toward
    ``max_facts``); raise if nothing is left. Returns ``(known, all_loaded)``."""
    if facts is None:
        facts = cfg.load()
    if holdout:
        note_single_families(facts)
    why: dict[str, int] = {}
    kept = filter_known(lm, facts, cfg, progress=progress, holdout=holdout, why=why)
    if not kept:
        unknown = (f"known by the model (answer in top {cfg.known_top_k} on >= {cfg.min_known_prompts} prompts); loosen "
                   "--known-top-k / --min-known-prompts")
        dropped = len(facts) - sum(why.values())  # left out at load, each named in a note
        if why.get("unknown") == len(facts):
            raise KscopeError(f"none of the {len(facts)} facts is {unknown}")
        reasons = [f"{dropped} left out at load (see the notes)"] if dropped else []
        if why.get("unknown"):
            reasons.append(f"{why['unknown']} not {unknown}")
        if why.get("one side"):
            reasons.append(f"{why['one side']} known on one side of the held-out split only (a held-out run needs a known "
                           "prompt on each side: one to choose units on, one to measure them on); give more paraphrases or "
                           "use --no-holdout")
        raise KscopeError(f"none of the {len(facts)} facts can be studied: {'; '.join(reasons)}")
    if why.get("one side"):
        note(f"{why['one side']} known facts have known prompts on one side of the held-out split only (ParaRel: in one "
             f"side's paraphrase families) and are left out; {len(kept)} keep both sides")
    if cfg.max_facts is not None and len(kept) < cfg.max_facts:
        known = "all of them are known" if len(kept) == len(facts) else f"{len(kept)} are known by the model" + \
            (" with prompts on both sides of the held-out split" if holdout else "")
        note(f"{len(kept)} facts studied, not {cfg.max_facts} (--max-facts): the source has {len(facts)} and {known}")
    return kept, facts
