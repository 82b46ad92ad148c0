"""ParaRel (Elazar et al., 2021): facts, their relation's paraphrase templates and the templates' families."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable

from kscope.errors import KscopeError
from kscope.facts.fact import Fact, read_jsonl
from kscope.facts.families import FAMILY_DIR, compute_families, template_families


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


def relation_templates(pattern_file: Path) -> list[str]:
    """A relation's usable templates (``[Y]`` last), as prompts with ``[X]``, in file order without repeats."""
    templates: list[str] = []
    for row in read_jsonl(pattern_file):
        t = template_to_prompt(str(row.get("pattern", "")))
        if t and t not in templates:
            templates.append(t)
    return templates


def _dirs(root: Path) -> tuple[Path, Path]:
    fdir, pdir = root / "facts", root / "patterns"
    if not fdir.is_dir() or not pdir.is_dir():
        raise KscopeError(f"{root} is not a ParaRel directory (needs facts/ and patterns/)")
    return fdir, pdir


def load_pararel(
    root: str | Path,
    relations: Iterable[str] | None = None,
    max_per_relation: int | None = None,
    seed: int = 0,
) -> list[Fact]:
    """Load ParaRel facts whose relation has usable templates (``[Y]`` last); each fact carries its prompts' template
    indices and its relation's template families.

    ``root`` holds ``facts/PXXX.jsonl`` and ``patterns/PXXX.jsonl`` (see ParaRel's README).
    """
    fdir, pdir = _dirs(Path(root))
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
        templates = relation_templates(pfile)
        if not templates:
            continue
        family_of = template_families(rel, templates).family_of()
        rows = read_jsonl(ffile)
        if max_per_relation is not None and len(rows) > max_per_relation:
            rows = rng.sample(rows, max_per_relation)
        for i, row in enumerate(rows):
            sub, obj = row.get("sub_label"), row.get("obj_label")
            if not isinstance(sub, str) or not isinstance(obj, str) or not sub.strip() or not obj.strip():
                raise KscopeError(f"{ffile}: fact {i} lacks sub_label/obj_label")
            prompts = [t.replace("[X]", sub) for t in templates]
            out.append(Fact(sub, rel, obj, prompts, uid=row.get("uuid") or f"{rel}:{sub}", templates=list(range(len(templates))),
                            families=list(family_of)))
    if wanted is not None:
        missing = wanted - {f.relation for f in out}
        if missing:
            raise KscopeError(f"no usable facts for relation(s) {', '.join(sorted(missing))} in {root}")
    if not out:
        raise KscopeError(f"no usable facts in {root}")
    return out


def write_template_families(root: str | Path, out_dir: str | Path = FAMILY_DIR) -> list[Path]:
    """Compute the families of every relation of the ParaRel directory ``root`` that has usable templates and write
    one ``<relation>.json`` each to ``out_dir`` (default: the package's data, which ``load_pararel`` reads)."""
    _, pdir = _dirs(Path(root))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for pfile in sorted(pdir.glob("*.jsonl")):
        templates = relation_templates(pfile)
        if templates:
            path = out / f"{pfile.stem}.json"
            path.write_text(compute_families(pfile.stem, templates).to_json(), encoding="utf-8")
            written.append(path)
    return written
