"""The fact record (subject, relation, object, paraphrase prompts) and the JSONL reader every source uses."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

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
    # ParaRel: the paraphrase family of each of the relation's templates (indexed by template, not by prompt), so it
    # stays whole when prompts are dropped; see facts.families.
    families: list[int] | None = None
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
        if self.families is not None and (self.templates is None or any(t >= len(self.families) for t in self.templates)):
            raise KscopeError(f"fact {self.uid or self.subject!r}: template families need a family for each template index")
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


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file, one a line (blank lines skipped); errors name the file and line."""
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


def left_out(what: str, names: Sequence[str]) -> None:
    """A note naming (the first three of) ``names``, when there are any."""
    if names:
        note(f"{len(names)} {what} left out: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}")
