"""The explorer's privacy pages: one per erased test person of each privacy model (the units located for them, each
method's best point on each of their secrets beside the unedited model and the retain twin, each attack's leak rate
on them beside the never-taught model, the retain twin and the unedited model) and an index with one line per person.
Pure rendering of ``EraseResult``s (no model): ``explorer`` calls it with the run's privacy results."""

from __future__ import annotations

import html
import math
import re
from pathlib import Path

from kscope.app import explorer_pages as pages
from kscope.app.tables import fmt
from kscope.io import write_text
from kscope.privacy.judge.leaks import no_more_than
from kscope.privacy.study.graded import FLOORS, TWIN, UNEDITED
from kscope.privacy.study.results import EraseResult, ErasurePoint, SecretOutcome

LEAK_NAMES = {"token_recovery": "tokens recovered", "prefix_share": "prefix share", "char_overlap": "characters (greedy)"}
PRODUCED, GONE = "background:#fcdcd6", "background:#dff2dc"  # still produced / no longer produced
EXTRA = "td.s{text-align:left}td.who{white-space:nowrap}"
OLD = f"This result (made before {EraseResult.schema()})"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


def person_file(run: str, person: str) -> str:
    return f"privacy/{slug(run)}-{slug(person)}.html"


def graded_people(res: EraseResult) -> list[str]:
    """The people graded on the test split (the split's forget-test role; else whoever the test measures name)."""
    got = list(res.split.get("forget-test", []))
    if not got:
        got = list(dict.fromkeys(s.person for s in res.secret_floors.get(UNEDITED, [])))
    if not got:
        got = list(dict.fromkeys(q for p in res.points for q in p.rel_people))
    return got


def best_points(res: EraseResult) -> list[ErasurePoint]:
    """Each method's best point (chosen on the validation people), in the order the methods ran."""
    out = []
    for m, v in dict.fromkeys((p.method, p.variant) for p in res.points if p.kind != "control"):
        b = res.best(m, v)
        if b is not None:
            out.append(b)
    return out


def _f(v, spec: str = ".2f") -> str:
    return fmt(v, spec)


def _le_twin(leaks: dict[str, float], twin: dict[str, float]) -> bool:
    """Every partial-leak measure no more than the retain twin's (``leaks.no_more_than``); one the twin lacks: no."""
    return all(no_more_than(list(leaks.values()), [math.nan if twin.get(k) is None else twin[k] for k in leaks]))


def _where(p: ErasurePoint) -> str:
    parts = [f"budget {p.budget}" if p.budget else "all units"]
    parts += [f"λ {p.lam:g}"] if p.lam is not None else []
    parts += [f"τ {p.tau:g}"] if p.tau is not None else []
    return ", ".join(parts)


def _mine(secrets: list[SecretOutcome], person: str) -> dict[str, SecretOutcome]:
    return {s.attribute: s for s in secrets if s.person == person}


def units_table(found: list[list], kind: str, explorer: Path) -> str:
    """A person's top units of one kind: rank, layer, unit (linked to its page when the explorer has one), score."""
    from kscope.app.explorer import unit_file  # here: explorer imports this module

    if not found:
        return f'<p class="muted">no {kind}s located</p>'
    rows = ""
    for r, (L, u, score) in enumerate(found, 1):
        page = unit_file(L, kind, u)
        cell = f'<a href="../{page}">{u}</a>' if (explorer / page).exists() else str(u)
        rows += f"<tr><td>{r}</td><td>{L}</td><td>{cell}</td><td>{score:.3g}</td></tr>"
    return (f"<table class='located'><thead><tr><th>rank</th><th>layer</th><th>{pages.swatch(kind)}{kind}</th><th>score</th></tr>"
            f"</thead><tbody>{rows}</tbody></table>")


def _produced(s: SecretOutcome | None) -> str:
    if s is None:
        return "<td>–</td>"
    return f"<td style='{PRODUCED if s.rel else GONE}'>{'produced' if s.rel else 'not produced'}</td>"


def secret_table(attribute: str, states: list[tuple[str, SecretOutcome | None]], twin: SecretOutcome | None) -> str:
    """One secret: each model state's greedy outcome on the held-out edit template, on the held-out phrasings, its rank
    among candidates, the partial-leak measures, and whether it leaks no more than the retain twin on every one."""
    leaks = list(dict.fromkeys(k for _, s in states if s for k in s.leaks))
    head = "".join(f"<th>{html.escape(LEAK_NAMES.get(k, k))}</th>" for k in leaks)
    rows = ""
    for label, s in states:
        if s is None:
            rows += f"<tr><td class='s'>{label}</td>" + "<td>–</td>" * (4 + len(leaks)) + "</tr>"
            continue
        ok = _le_twin(s.leaks, twin.leaks) if twin is not None and s is not twin else None
        rows += (f"<tr><td class='s'>{label}</td>{_produced(s)}<td>{_f(s.gen)}</td>"
                 f"<td>{'–' if s.rank is None else f'{s.rank + 1} of {s.candidates}'}</td>"
                 + "".join(f"<td>{_f(s.leaks.get(k))}</td>" for k in leaks)
                 + f"<td>{'–' if ok is None else 'yes' if ok else 'no'}</td></tr>")
    return (f"<h3>{html.escape(attribute)}</h3><table class='secret'><thead><tr><th>model</th><th>held-out template (greedy)</th>"
            f"<th>held-out phrasings producing it</th><th>rank among candidates</th>{head}<th>≤ twin on every measure</th></tr>"
            f"</thead><tbody>{rows}</tbody></table>")


def attack_table(res: EraseResult, person: str) -> str:
    """Per attack, the share of this person's (secret, prompt) pairs leaked: the floors first, then each attacked model."""
    rows = [r for r in res.attacks if r.people]
    if not rows:
        return '<p class="muted">no per-person attack rates in this result</p>'
    rows = sorted(rows, key=lambda r: FLOORS.index(r.method) if r.method in FLOORS else len(FLOORS))
    names = list(dict.fromkeys(n for r in rows for n in r.people))
    head = "".join(f"<th>{html.escape(r.method)}" + (f" ({r.budget})" if r.budget not in ("–", "") else "") + "</th>" for r in rows)
    body = ""
    for n in names:
        cells = "".join(f"<td>{_f(r.people.get(n, {}).get(person))}</td>" for r in rows)
        body += f"<tr><td class='s'>{html.escape(n)}</td>{cells}</tr>"
    return (f"<table class='attacks'><thead><tr><th>attack</th>{head}</tr></thead><tbody>{body}</tbody></table>"
            "<p class='muted'>Share of this person's (secret, prompt) pairs each attack recovers; the never-taught model is the "
            "floor (a format guessed, not a secret known), the unedited model the ceiling, the retain twin what a model never "
            "taught these people but taught everyone else leaks.</p>")


def method_table(bests: list[ErasurePoint], unedited: dict[str, SecretOutcome], twin: dict[str, SecretOutcome], person: str) -> str:
    """Each method's best point on this person: Rel, Gen, Δ log P (the study's per-person measures) and how many of the
    secrets the unedited model produces it erases."""
    produced = [a for a, s in unedited.items() if s.rel]
    rows = ""
    for p in bests:
        mine = _mine(p.secrets, person)
        gone = sum(1 for a in produced if a in mine and not mine[a].rel)
        le = [_le_twin(s.leaks, twin[a].leaks) for a, s in mine.items() if a in twin]
        rows += (f"<tr><td class='s'>{html.escape(p.label)}</td><td class='s'>{_where(p)}</td><td>{_f(p.rel_people.get(person))}</td>"
                 f"<td>{_f(p.gen_people.get(person))}</td><td>{_f(p.dlogp_people.get(person), '+.2f')}</td>"
                 f"<td>{f'{gone} of {len(produced)}' if mine and unedited else '–'}</td>"
                 f"<td>{f'{sum(le)} of {len(le)}' if le else '–'}</td></tr>")
    return ("<table class='methods'><thead><tr><th>method</th><th>best point (validation)</th><th>Rel ↑</th><th>Gen ↑</th>"
            "<th>Δ log P(secret)</th><th>erased (held-out template)</th><th>≤ twin on every measure</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def person_page(name: str, res: EraseResult, person: str, explorer: Path) -> str:
    bests = best_points(res)
    unedited = _mine(res.secret_floors.get(UNEDITED, []), person)
    twin = _mine(res.secret_floors.get(TWIN, []), person)
    located = res.person_units.get(person, {})
    parts = [f"<p>Privacy model <b>{html.escape(name)}</b> ({html.escape(res.model_dir)}, taught from "
             f"{html.escape(res.base_model)}); {html.escape(person)} is an erased person of the <b>test</b> split: no setting was "
             f"chosen on them. Band: layer{'s' if len(res.layers) > 1 else ''} {', '.join(map(str, res.layers))}.</p>",
             "<h2>Located units</h2>"]
    if located:
        parts.append("<p class='muted'>This person's own top units: mean attribution score over their secrets' key prompts, "
                     "after the specificity steps (" + html.escape(", ".join(res.config.get("specificity", [])) or "none")
                     + "). A linked unit's page shows it in the explorer's model, before the secrets were taught.</p>"
                     f"<div class='cols'>{units_table(located.get('neurons', []), 'neuron', explorer)}"
                     f"{units_table(located.get('features', []), 'feature', explorer)}</div>")
    else:
        parts.append(f"<p class='muted'>{OLD} keeps no per-person located units.</p>")
    parts.append("<h2>Each method's best point on this person</h2>")
    parts.append(method_table(bests, unedited, twin, person) if bests else "<p class='muted'>no method points</p>")
    parts.append("<h2>Each secret</h2>")
    attributes = list(dict.fromkeys([*unedited, *twin, *(a for p in bests for a in _mine(p.secrets, person))]))
    if attributes:
        parts.append("<p class='muted'>Greedy decoding on the held-out edit template (red: still produced; green: not); the "
                     "share of held-out phrasings that still produce the secret; its rank among candidates of its format; "
                     "the partial-leak measures (means over the held-out prompts), each read against the retain twin's.</p>")
        for a in attributes:
            states = [(UNEDITED, unedited.get(a)), (TWIN, twin.get(a))]
            states += [(f"{html.escape(p.label)} ({_where(p)})", _mine(p.secrets, person).get(a)) for p in bests]
            parts.append(secret_table(a, states, twin.get(a)))
    else:
        parts.append(f"<p class='muted'>{OLD} keeps no per-secret outcomes; run privacy erase again for them.</p>")
    parts.append(f"<h2>Attacks</h2>{attack_table(res, person)}")
    return pages.page(f"{person} · privacy model {name}", "".join(parts), depth=1, head=f"<style>{EXTRA}</style>")


def outcome_line(res: EraseResult, person: str) -> str:
    """One line: how many secrets the unedited model produces, which method erases most of them, the worst attack."""
    unedited = _mine(res.secret_floors.get(UNEDITED, []), person)
    produced = [a for a, s in unedited.items() if s.rel]
    parts = [f"unedited produces {len(produced)} of {len(unedited)} secrets"] if unedited else []
    erased = []
    for p in best_points(res):
        mine = _mine(p.secrets, person)
        if mine and produced:
            erased.append((sum(1 for a in produced if a in mine and not mine[a].rel), p.label))
    if erased:
        most = max(n for n, _ in erased)
        tied = [lab for n, lab in erased if n == most]
        parts.append(f"erased on the held-out template, most by {tied[0]}" + (f" (+{len(tied) - 1} tied)" if len(tied) > 1 else "")
                     + f" {most}/{len(produced)}")
        feats = next((n for n, lab in erased if lab == "keyed-features"), None)
        if feats is not None and "keyed-features" not in tied:
            parts.append(f"keyed-features {feats}/{len(produced)}")
    leaks = [(v.get(person), n, r.method) for r in res.attacks if r.method not in FLOORS for n, v in r.people.items()
             if v.get(person) is not None]
    if leaks:
        v, n, m = max(leaks, key=lambda x: x[0])
        parts.append(f"worst attack on an edited model: {v:.2f} ({n}, {m})")
    if not parts:
        rel = [(p.rel_people[person], p.label) for p in best_points(res) if person in p.rel_people]
        parts = [f"best Rel {max(rel)[0]:.2f} ({max(rel)[1]})"] if rel else ["no per-person measures"]
    return " · ".join(parts)


def write_privacy_pages(explorer: Path, runs: dict[str, EraseResult]) -> Path | None:
    """``<explorer>/privacy/index.html`` and a page per test person of each privacy model; None if there is none."""
    if not runs:
        return None
    body = ""
    for name, res in runs.items():
        rows = ""
        for person in graded_people(res):
            f = person_file(name, person)
            write_text(explorer / f, person_page(name, res, person, explorer))
            rows += (f"<tr><td class='s who'><a href='../{f}'>{html.escape(person)}</a></td>"
                     f"<td class='s'>{html.escape(outcome_line(res, person))}</td></tr>")
        body += (f"<h2>Privacy model {html.escape(name)}</h2><p class='muted'>{res.n_erased_people} erased people "
                 f"(validation and test); the test people below were never used to choose a setting.</p>"
                 + (f"<table class='people'><thead><tr><th>person</th><th>outcome</th></tr></thead><tbody>{rows}</tbody></table>"
                    if rows else "<p class='muted'>no test people in this result</p>"))
    return write_text(explorer / "privacy" / "index.html",
                      pages.page("Erased people", body, depth=1, head=f"<style>{EXTRA}</style>"))
