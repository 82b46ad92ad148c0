"""Facts (subject, relation, object, paraphrase prompts): ParaRel loading, the built-in set,
JSONL fact files, answer-token resolution and the "does the model know it" filter."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Sequence

from kscope.config import Config, option
from kscope.errors import KscopeError
from kscope.progress import note


@dataclass
class Fact:
    """A fact and the prompts that ask for its object (each prompt ends right before the object)."""

    subject: str
    relation: str
    object: str
    prompts: list[str]
    heldout_prompts: list[str] = field(default_factory=list)
    uid: str = ""
    templates: list[int] | None = None  # ParaRel: the index of each prompt's template in its relation's template list
    # Filled by resolve_targets: the answer's first token, whether the object needed more than one, and
    # (when the whole answer is scored) all its tokens and the first of them that is scored.
    target_id: int | None = None
    multi_token: bool = False
    target_tokens: list[int] | None = None
    score_from: int = 0

    def __post_init__(self) -> None:
        for name in ("subject", "relation", "object"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise KscopeError(f"fact {self.uid or self.subject!r}: field {name!r} must be a non-empty string")
        if self.templates is not None and len(self.templates) != len(self.prompts):
            raise KscopeError(f"fact {self.uid or self.subject!r}: {len(self.templates)} template indices for {len(self.prompts)} prompts")
        keep = [i for i, p in enumerate(self.prompts) if isinstance(p, str) and p.strip()]
        self.prompts = [self.prompts[i] for i in keep]
        if self.templates is not None:
            self.templates = [self.templates[i] for i in keep]
        if not self.prompts:
            raise KscopeError(f"fact {self.uid or self.subject!r} has no prompts")
        if not self.uid:
            self.uid = f"{self.relation}:{self.subject}"

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """``subject -> object (relation)``, as notes and errors name a fact."""
        return f"{self.subject} -> {self.object} ({self.relation})"

    def with_prompts(self, prompts: Sequence[str]) -> "Fact":
        """This fact with only ``prompts`` (some of its own), template indices kept in step."""
        idx = [self.prompts.index(p) for p in prompts]
        return replace(self, prompts=[self.prompts[i] for i in idx],
                       templates=None if self.templates is None else [self.templates[i] for i in idx])


@dataclass
class FactConfig(Config):
    """Which facts to use and how to filter them."""

    facts: str | None = option(None, "ParaRel directory or .jsonl fact file; default: the built-in set.", reads=True)
    relations: list[str] | None = option(None, "ParaRel relation ids to keep (e.g. P36,P103); ParaRel only.", flag="relation-ids")
    max_facts: int | None = option(None, "Keep at most this many known facts.", min=1)
    max_per_relation: int = option(50, "ParaRel facts sampled per relation before filtering.", min=1)
    max_prompts: int = option(8, "At most this many paraphrases per fact.", min=1)
    known_top_k: int = option(1, "A prompt is known if the answer token is within the top k.", min=1)
    min_known_prompts: int = option(2, "Keep a fact if at least this many of its prompts are known (paraphrases are needed for refinement).", min=1)
    multi_token: str = option("first", "Objects of several tokens: 'first' (score the first token), 'whole' (score the log-probability "
                              "of all its tokens, teacher-forced), 'skip' or 'error'.",
                              choices=("first", "whole", "skip", "error"), label="multi-token policy")
    answer_tokens: str = option("all", "With --multi-token whole: score 'all' answer tokens, or only the 'distinct' ones after "
                                "the prefix that every object of the relation shares.", choices=("all", "distinct"))
    seed: int = option(0, "Sampling seed.")

    def load(self) -> list["Fact"]:
        """The facts this config names, before the known filter."""
        return load_facts(self.facts, self.relations, self.max_per_relation, self.seed)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise KscopeError(f"{path}:{i}: not UTF-8 (byte {e.start + 1} of the line); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise KscopeError(f"{path}:{i}: malformed JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise KscopeError(f"{path}:{i}: expected a JSON object")
            rows.append(row)
    return rows


def template_to_prompt(pattern: str) -> str | None:
    """ParaRel pattern -> prompt prefix with ``[X]`` kept, or None if ``[Y]`` is not at the end.

    A causal LM can only be asked for the object when the object comes last.
    """
    p = pattern.strip()
    if "[X]" not in p or p.count("[Y]") != 1:
        return None
    before, after = p.split("[Y]")
    if after.strip() not in ("", ".") or "[X]" not in before:
        return None
    before = before.rstrip()
    return before if before.replace("[X]", "").strip() else None


def load_pararel(
    root: str | Path,
    relations: Iterable[str] | None = None,
    max_per_relation: int | None = None,
    seed: int = 0,
) -> list[Fact]:
    """Load ParaRel facts whose relation has usable templates (``[Y]`` last).

    ``root`` holds ``facts/PXXX.jsonl`` and ``patterns/PXXX.jsonl`` (see ParaRel's README).
    """
    root = Path(root)
    fdir, pdir = root / "facts", root / "patterns"
    if not fdir.is_dir() or not pdir.is_dir():
        raise KscopeError(f"{root} is not a ParaRel directory (needs facts/ and patterns/)")
    wanted = set(relations) if relations else None
    out: list[Fact] = []
    rng = random.Random(seed)
    for ffile in sorted(fdir.glob("*.jsonl")):
        rel = ffile.stem
        if wanted is not None and rel not in wanted:
            continue
        pfile = pdir / f"{rel}.jsonl"
        if not pfile.exists():
            continue
        templates = []
        for row in _read_jsonl(pfile):
            t = template_to_prompt(str(row.get("pattern", "")))
            if t and t not in templates:
                templates.append(t)
        if not templates:
            continue
        rows = _read_jsonl(ffile)
        if max_per_relation is not None and len(rows) > max_per_relation:
            rows = rng.sample(rows, max_per_relation)
        for i, row in enumerate(rows):
            sub, obj = row.get("sub_label"), row.get("obj_label")
            if not isinstance(sub, str) or not isinstance(obj, str) or not sub.strip() or not obj.strip():
                raise KscopeError(f"{ffile}: fact {i} lacks sub_label/obj_label")
            prompts = [t.replace("[X]", sub) for t in templates]
            out.append(Fact(sub, rel, obj, prompts, uid=row.get("uuid") or f"{rel}:{sub}", templates=list(range(len(templates)))))
    if wanted is not None:
        missing = wanted - {f.relation for f in out}
        if missing:
            raise KscopeError(f"no usable facts for relation(s) {', '.join(sorted(missing))} in {root}")
    if not out:
        raise KscopeError(f"no usable facts in {root}")
    return out


def holdout_option():
    """The ``--holdout/--no-holdout`` option of every job that chooses units and then measures them."""
    return option(True, "Choose each fact's units on some of its prompts and measure them on the others, so no prompt both "
                        "selects and evaluates (ParaRel: the relation's even-numbered templates select and the odd-numbered "
                        "ones measure, for every fact of the relation; other facts: even- and odd-numbered paraphrases); "
                        "--no-holdout: the same prompts do both (in-sample, the paper's protocol). Facts whose prompts fall "
                        "on one side only are left out of a held-out run.")


def _halves(fact: Fact) -> tuple[list[str], list[str]]:
    """Selection and measurement prompts: by template parity when the fact knows its templates, else by position."""
    if fact.templates is not None:
        return ([p for p, t in zip(fact.prompts, fact.templates) if t % 2 == 0],
                [p for p, t in zip(fact.prompts, fact.templates) if t % 2 == 1])
    return fact.prompts[0::2], fact.prompts[1::2]


def splittable(facts: Sequence[Fact]) -> list[Fact]:
    """The facts a held-out split can use (a prompt on each side); says how many are left out, refuses if none is left."""
    kept = [f for f in facts if all(_halves(f))]
    if not kept:
        raise KscopeError("no fact has prompts on both sides of the held-out split; use --no-holdout or more paraphrases")
    if len(kept) < len(facts):
        note(f"{len(facts) - len(kept)} facts with prompts on one side of the split only are left out (--holdout)")
    return kept


def split_prompts(fact: Fact, holdout: bool) -> tuple[Fact, Fact]:
    """``(select, measure)`` views of a fact; without ``holdout`` both are the whole fact. A ParaRel fact is split by
    template: even-numbered templates of its relation select, odd-numbered ones measure, so no template that chose
    any fact's units of the relation is ever measured. Other facts alternate their own paraphrases (0, 2, ... select)."""
    if not holdout:
        return fact, fact
    sel, meas = _halves(fact)
    if not sel or not meas:
        raise KscopeError(f"fact {fact.uid}: a held-out split needs prompts on both sides, it has {len(sel)} and {len(meas)}")
    return fact.with_prompts(sel), fact.with_prompts(meas)


def split_kind(facts: Sequence[Fact], holdout: bool) -> str:
    """How the facts' prompts were split, for results and report titles."""
    if not holdout:
        return "in-sample (the same prompts select and measure)"
    if facts and all(f.templates is not None for f in facts):
        return "template-disjoint (a relation's even templates select, its odd templates measure)"
    return "paraphrase alternation (selection and measurement prompts can be near-duplicates)"


def load_fact_file(path: str | Path) -> list[Fact]:
    """Facts from JSONL: ``{"subject", "relation", "object", "prompts": [...], "heldout_prompts"?: [...]}``."""
    path = Path(path)
    if not path.exists():
        raise KscopeError(f"fact file {path} does not exist")
    facts = []
    for i, row in enumerate(_read_jsonl(path), 1):
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


def _left_out(what: str, names: Sequence[str]) -> None:
    if names:
        note(f"{len(names)} {what} left out: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}")


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
    _left_out("repeated facts are", dropped)
    return out


def _ends_with(prompt: str, obj: str) -> bool:
    """Does ``prompt`` end with the word(s) ``obj`` (case and a final full stop aside)?"""
    p, o = prompt.rstrip(" .").lower(), obj.strip().lower()
    return p.endswith(o) and (len(p) == len(o) or not p[-len(o) - 1].isalnum())


def _prune_prompts(facts: Sequence[Fact], bad: Callable[[Fact, str], bool], what: str) -> list[Fact]:
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
    _left_out(f"prompts that {what} are", dropped)
    _left_out(f"facts with no prompt left (they {what}) are", emptied)
    return out


def asking(facts: Sequence[Fact]) -> list[Fact]:
    """``facts`` whose prompts ask for the object: a prompt that already ends with it is left out (a fact with none
    left too)."""
    return _prune_prompts(facts, lambda f, p: _ends_with(p, f.object), "already end with their object")


def write_fact_file(facts: Sequence[Fact], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for fact in facts:
            d = fact.to_dict()
            f.write(json.dumps({k: d[k] for k in ("subject", "relation", "object", "prompts", "heldout_prompts", "uid")}) + "\n")


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
    _left_out(f"facts whose object holds the unknown token {tokenizer.unk_token!r} are", [f.describe() for f in unknown])
    facts = [f for f in facts if f not in unknown]
    if context:
        facts = _prune_prompts(facts, lambda f, p: _too_long(tokenizer, p, len(tokens[f.uid]), context),
                               f"do not fit the model's context of {context} tokens with their answer")
    shared: dict[str, int] = {}
    if multi_token == "whole" and answer_tokens == "distinct":
        from kscope.locate.objectives import shared_prefix

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
    _left_out("facts whose object is several tokens are (--multi-token skip)", skipped)
    return out


def _ranks(lm, part: Sequence[Fact], cfg: FactConfig, batch_size: int) -> list[tuple[int, str, int]]:
    """``(fact index, prompt, rank)`` for the first ``max_prompts`` prompts of each fact in ``part``; the rank
    of the answer's first token, or for whole-answer facts the worst rank of its tokens."""
    from kscope.model.readout import answer_logprobs, answer_probs

    if cfg.multi_token == "whole":
        out = []
        for i, f in enumerate(part):
            prompts = f.prompts[: cfg.max_prompts]
            _, worst = answer_logprobs(lm.model, lm.tokenizer, prompts, f.target_tokens, f.score_from, batch_size=batch_size)
            out += [(i, p, int(r)) for p, r in zip(prompts, worst.tolist())]
        return out
    pairs = [(i, p) for i, f in enumerate(part) for p in f.prompts[: cfg.max_prompts]]
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
    if cfg.max_facts is not None and len(kept) < cfg.max_facts:
        known = "all of them are known" if len(kept) == len(facts) else f"{len(kept)} are known by the model" + \
            (" with prompts on both sides of the held-out split" if holdout else "")
        note(f"{len(kept)} facts studied, not {cfg.max_facts} (--max-facts): the source has {len(facts)} and {known}")
    return kept, facts
