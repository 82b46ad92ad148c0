"""The records ``kscope forget`` erases or keeps: JSONL, one per line, validated against ``records.schema.json``.

A record without ``prompts`` uses its attribute's built-in templates (PrivacyParaRel's): per attribute one edit template
is held out of the edit, as in the erase study (``splits.held_out_templates``), and the audit scores it with the
held-out templates; the attack phrasings are used by the attacks alone. With ``prompts``, the last one is held out and
the others are key prompts. Errors name the file and line and are raised before any model work.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from kscope.errors import KscopeError
from kscope.io import read_utf8
from kscope.facts import Fact
from kscope.privacy.data.dataset import ATTACK_TEMPLATES, TEMPLATES
from kscope.privacy.data.splits import held_out_templates

SCHEMA = json.loads(resources.files(__package__).joinpath("records.schema.json").read_text())
FIELDS = tuple(SCHEMA["properties"])
REQUIRED = tuple(SCHEMA["required"])
# Free-text attribute names that mean a built-in one (lower case, spaces for '_' and '-').
SYNONYMS = {"phone": "phone", "phone number": "phone", "telephone": "phone", "telephone number": "phone", "mobile": "phone",
            "email": "email", "e mail": "email", "email address": "email", "e mail address": "email", "mail": "email",
            "city": "city", "home city": "city", "hometown": "city", "address": "city", "employer": "employer",
            "company": "employer", "workplace": "employer", "birthdate": "birthdate", "birth date": "birthdate",
            "date of birth": "birthdate", "birthday": "birthdate", "dob": "birthdate"}


@dataclass
class Record:
    """One record: the secret about ``subject``, its key prompts (the edit sees only these) and held-out prompts (the audit
    scores these: a held-out edit-style prompt first, then new phrasings)."""

    subject: str
    attribute: str
    secret: str
    key_prompts: list[str]
    held_out: list[str]
    attack_prompts: list[str] = field(default_factory=list)  # phrasings no other step uses (built-in attributes only)
    line: int = 0

    @property
    def uid(self) -> str:
        return f"{self.attribute}:{self.subject}:{self.secret}"

    def key_fact(self) -> Fact:
        """The record as the edit sees it: its key prompts only."""
        return Fact(self.subject, self.attribute, self.secret, list(self.key_prompts), uid=self.uid)

    def audit_fact(self) -> Fact:
        """The record as the audit scores it: its held-out prompts only."""
        return Fact(self.subject, self.attribute, self.secret, list(self.held_out[:1]), heldout_prompts=list(self.held_out[1:]),
                    uid=self.uid)


def builtin_attribute(attribute: str) -> str | None:
    """The built-in attribute a free-text one names, if any."""
    return SYNONYMS.get(" ".join(attribute.lower().replace("_", " ").replace("-", " ").split()))


def _problem(obj) -> str | None:
    """What is wrong with one parsed line, by the schema's rules."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        return f"unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})"
    for k in REQUIRED:
        if k not in obj:
            return f"missing field {k!r}"
        if not isinstance(obj[k], str) or not obj[k].strip():
            return f"field {k!r} must be a non-empty string"
    prompts = obj.get("prompts")
    if prompts is not None:
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
            return "field 'prompts' must be a list of non-empty strings"
        if len(prompts) < 2:
            return "field 'prompts' needs at least two prompts (one is held out of the edit and audited)"
        if any(obj["subject"].strip() not in p for p in prompts):
            return "every prompt must name the subject as written in 'subject'"
        if any(obj["secret"].strip().lower() in p.lower() for p in prompts):
            return "a prompt contains the secret itself"
    elif builtin_attribute(obj["attribute"]) is None:
        return (f"attribute {obj['attribute']!r} has no built-in templates ({', '.join(TEMPLATES)}); give 'prompts'")
    return None


def record_of(obj: dict, line: int, held: dict[str, int]) -> Record:
    """A validated line as a ``Record``. Built-in attributes: edit template ``held[attribute]`` is held out with the
    attribute's held-out templates; given prompts: the last one is held out."""
    subject, secret = obj["subject"].strip(), obj["secret"].strip()
    if obj.get("prompts") is not None:
        prompts = [p.rstrip() for p in obj["prompts"]]
        return Record(subject, obj["attribute"].strip(), secret, prompts[:-1], prompts[-1:], [], line)
    attr = builtin_attribute(obj["attribute"])
    edit, new = TEMPLATES[attr]
    fill = lambda ts: [t.replace("[X]", subject) for t in ts]  # noqa: E731
    h = held[attr] % len(edit)
    return Record(subject, attr, secret, fill([t for j, t in enumerate(edit) if j != h]), fill([edit[h], *new]),
                  fill(ATTACK_TEMPLATES[attr]), line)


def read_records(path: str | Path, what: str = "--records") -> list[Record]:
    """Every record of a JSONL file; one-line errors ``FILE:LINE: ...`` for anything malformed, repeats included."""
    text = read_utf8(path, f"{what} {path}")
    objs: list[tuple[int, dict]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise KscopeError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno})") from None
        problem = _problem(obj)
        if problem:
            raise KscopeError(f"{path}:{n}: {problem}")
        objs.append((n, obj))
    held = held_out_templates(list(TEMPLATES))
    out: list[Record] = []
    seen: dict[str, int] = {}
    for n, obj in objs:
        rec = record_of(obj, n, held)
        if rec.uid in seen:
            raise KscopeError(f"{path}:{n}: repeats the record of line {seen[rec.uid]}")
        seen[rec.uid] = n
        out.append(rec)
    if not out:
        raise KscopeError(f"{what} {path}: no records")
    return out


def file_hash(path: str | Path | None) -> str | None:
    """SHA-256 of a file's bytes (the audit names its inputs by these)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None
