"""Facts (subject, relation, object, paraphrase prompts): ParaRel loading, the built-in set,
JSONL fact files, answer-token resolution and the "does the model know it" filter."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

from kscope.config import Config, option
from kscope.errors import KscopeError


@dataclass
class Fact:
    """A fact and the prompts that ask for its object (each prompt ends right before the object)."""

    subject: str
    relation: str
    object: str
    prompts: list[str]
    heldout_prompts: list[str] = field(default_factory=list)
    uid: str = ""
    # Filled by resolve_targets: the scored answer token and whether the object needed more than one.
    target_id: int | None = None
    multi_token: bool = False

    def __post_init__(self) -> None:
        for name in ("subject", "relation", "object"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise KscopeError(f"fact {self.uid or self.subject!r}: field {name!r} must be a non-empty string")
        self.prompts = [p for p in self.prompts if isinstance(p, str) and p.strip()]
        if not self.prompts:
            raise KscopeError(f"fact {self.uid or self.subject!r} has no prompts")
        if not self.uid:
            self.uid = f"{self.relation}:{self.subject}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FactConfig(Config):
    """Which facts to use and how to filter them."""

    facts: str | None = option(None, "ParaRel directory or .jsonl fact file; default: the built-in set.")
    relations: list[str] | None = option(None, "ParaRel relation ids to keep (e.g. P36,P103); ParaRel only.", flag="relation-ids")
    max_facts: int | None = option(None, "Keep at most this many known facts.", min=1)
    max_per_relation: int = option(50, "ParaRel facts sampled per relation before filtering.", min=1)
    max_prompts: int = option(8, "At most this many paraphrases per fact.", min=1)
    known_top_k: int = option(1, "A prompt is known if the answer token is within the top k.", min=1)
    min_known_prompts: int = option(2, "Keep a fact if at least this many of its prompts are known (paraphrases are needed for refinement).", min=1)
    multi_token: str = option("first", "Objects of several tokens: 'first' (score the first token), 'skip' or 'error'.",
                              choices=("first", "skip", "error"), label="multi-token policy")
    seed: int = option(0, "Sampling seed.")

    def load(self) -> list["Fact"]:
        """The facts this config names, before the known filter."""
        return load_facts(self.facts, self.relations, self.max_per_relation, self.seed)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
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
            out.append(Fact(sub, rel, obj, prompts, uid=row.get("uuid") or f"{rel}:{sub}"))
    if wanted is not None:
        missing = wanted - {f.relation for f in out}
        if missing:
            raise KscopeError(f"no usable facts for relation(s) {', '.join(sorted(missing))} in {root}")
    if not out:
        raise KscopeError(f"no usable facts in {root}")
    return out


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
        if not isinstance(row["prompts"], list):
            raise KscopeError(f"{path}: fact {i}: 'prompts' must be a list")
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
    """Built-in facts (``None``), a ParaRel directory, or a JSONL fact file."""
    if source is None:
        facts = builtin_facts()
        if relations:
            facts = [f for f in facts if f.relation in set(relations)]
    else:
        p = Path(source)
        if p.is_dir():
            facts = load_pararel(p, relations, max_per_relation, seed)
        elif p.suffix == ".jsonl" or p.exists():
            facts = load_fact_file(p)
        else:
            raise KscopeError(f"fact source {source} does not exist")
    if not facts:
        raise KscopeError("the fact set is empty")
    return facts


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


def resolve_targets(facts: Sequence[Fact], tokenizer, multi_token: str = "first") -> list[Fact]:
    """Set each fact's ``target_id``; handle multi-token objects per ``multi_token``."""
    if multi_token not in ("first", "skip", "error"):
        raise KscopeError(f"multi_token must be first, skip or error, not {multi_token!r}")
    out = []
    for f in facts:
        tid, multi = answer_token(tokenizer, f.object)
        if multi and multi_token == "error":
            raise KscopeError(f"target {f.object!r} of fact {f.uid} is not one token ({len(tokenizer(' ' + f.object, add_special_tokens=False).input_ids)} tokens)")
        if multi and multi_token == "skip":
            continue
        f.target_id, f.multi_token = tid, multi
        out.append(f)
    return out


def filter_known(lm, facts: Sequence[Fact], cfg: FactConfig, batch_size: int = 64, chunk: int = 128) -> list[Fact]:
    """Keep facts the model knows: the answer token is in the top ``known_top_k`` on at least
    ``min_known_prompts`` prompts. Unknown prompts are dropped from kept facts.

    With ``max_facts``, facts are visited in a seeded random order (so relations mix) and scoring
    stops once enough are kept.
    """
    from kscope.model.readout import answer_probs

    facts = resolve_targets(facts, lm.tokenizer, cfg.multi_token)
    if cfg.max_facts is not None:
        facts = random.Random(cfg.seed).sample(facts, len(facts))
    kept: list[Fact] = []
    for start in range(0, len(facts), chunk):
        part = facts[start : start + chunk]
        prompts, owner = [], []
        for i, f in enumerate(part):
            for p in f.prompts[: cfg.max_prompts]:
                prompts.append(p)
                owner.append(i)
        order = sorted(range(len(prompts)), key=lambda j: len(prompts[j]))  # less padding
        _, ranks_sorted = answer_probs(lm.model, lm.tokenizer, [prompts[j] for j in order],
                                       [part[owner[j]].target_id for j in order], batch_size=batch_size)
        ranks = [0] * len(prompts)
        for j, r in zip(order, ranks_sorted.tolist()):
            ranks[j] = r
        known: dict[int, list[str]] = {}
        for p, i, r in zip(prompts, owner, ranks):
            if r < cfg.known_top_k:
                known.setdefault(i, []).append(p)
        for i, f in enumerate(part):
            ok = known.get(i, [])
            if len(ok) >= cfg.min_known_prompts:
                kept.append(replace(f, prompts=ok))
            if cfg.max_facts is not None and len(kept) >= cfg.max_facts:
                return kept
    return kept


def prepare_facts(lm, cfg: FactConfig, facts: list[Fact] | None = None) -> tuple[list[Fact], list[Fact]]:
    """Load (unless given), resolve and filter facts; raise if nothing is left. Returns ``(known, all_loaded)``."""
    if facts is None:
        facts = cfg.load()
    kept = filter_known(lm, facts, cfg)
    if not kept:
        raise KscopeError(
            f"none of the {len(facts)} facts is known by the model (answer in top {cfg.known_top_k} "
            f"on >= {cfg.min_known_prompts} prompts); loosen --known-top-k / --min-known-prompts"
        )
    return kept, facts
