"""``forget-audit.html``: the audit as a page that answers first (written or refused, and why), then the evidence."""

from __future__ import annotations

import html
from pathlib import Path

from kscope.io import write_text
from kscope.pages import CHECK, STYLE


def _f(x, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def _table(head: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "<p class='muted'>none</p>"
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def render(res) -> str:
    """The page of a ``ForgetResult``."""
    e = html.escape
    erased = sum(r.status == "erased" for r in res.records)
    produced = sum(r.status != "not produced" for r in res.records)
    verdict = ("passed: every record the model produced is gone from its held-out prompts and locality holds"
               if res.passed else "failed: " + "; ".join(res.reasons))
    wrote = "the edited model was written" if res.written else "the edited model was NOT written (exit 3; --allow-partial writes it)"
    colour = "#1a7f37" if res.passed else "#b42318"
    d = res.delta_ppl
    still = [f"{k} {v['after']:.2f}" for k, v in res.attacks.items() if (v.get("after") or 0) > 0]
    head = (f"<p style='font-size:1.2em;color:{colour}'><b>{e(verdict)}</b></p><p>{e(wrote)}. Erased {erased} of {produced} "
            f"records the model produced ({len(res.records) - produced} it did not produce). Kept records still produced: "
            f"{_f(res.keep_records.get('kept'))} of {res.keep_records.get('pairs')} held-out pairs; known facts: "
            f"{_f(res.keep_facts.get('kept'))} of {res.keep_facts.get('pairs')}. Perplexity change on held-out text: "
            f"{_f(d.mean, '+.1%')} [{_f(d.lo, '+.1%')}, {_f(d.hi, '+.1%')}] over {d.n} texts.</p>"
            + (f"<p style='color:#b54708'><b>Attacks still recover records after the edit</b> (status 'erased' is greedy "
               f"decoding on held-out prompts): {e(', '.join(still))}.</p>" if still else "") +
            f"<p class='muted'>{e(res.method)} at layers {', '.join(map(str, res.layers))}, λ {res.lam:g}. Every number is on "
            "prompts, people, facts and texts the edit never saw.</p>")
    recs = _table(["line", "subject", "attribute", "status", "produced before → after (held-out prompts)", "token recovery",
                   "longest prefix", "char overlap", "Δ log P"],
                  [[str(r.line), e(r.subject), e(r.attribute), e(r.status),
                    f"{sum(r.before.produced)}/{len(r.before.produced)} → {sum(r.after.produced)}/{len(r.after.produced)}",
                    f"{_f(r.before.token_recovery)} → {_f(r.after.token_recovery)}", f"{_f(r.before.prefix_share)} → {_f(r.after.prefix_share)}",
                    f"{_f(r.before.char_overlap)} → {_f(r.after.char_overlap)}", _f(r.after.logp - r.before.logp, "+.2f")]
                   for r in res.records])
    atk = _table(["attack", "leaks on the unedited model", "leaks after the edit"],
                 [[e(k), _f(v["before"]), _f(v["after"])] for k, v in res.attacks.items()])
    names = list(res.attacks)
    per = _table(["line", "subject", *names],
                 [[str(r.line), e(r.subject), *(f"{_f(r.attacks[k]['before'])} → {_f(r.attacks[k]['after'])}" if k in r.attacks
                                                else "–" for k in names)] for r in res.records if r.attacks])
    top = sorted(res.layer_effects.items(), key=lambda kv: kv[1])[:8]
    trace = _table(["layer", "Δ log P(record) when its MLP output is zeroed at the answer", "edited"],
                   [[str(L), _f(v, "+.2f"), "yes" if int(L) in res.layers else ""] for L, v in top])
    kept = _table(["kept people", "role"], [[e(p), role] for role, ps in res.kept_people.items() for p in ps])
    w = _table(["tensor", "entries changed", "of", "‖ΔW‖/‖W‖"],
               [[e(c.tensor), str(c.changed), str(c.size), _f(c.relative_norm, ".4f")] for c in res.weights])
    sizes = _table(["set", "size"], [[e(k), str(v)] for k, v in res.sizes.items()])
    inputs = _table(["input", "sha256 / fingerprint"], [[e(k), e(str(v))] for k, v in res.inputs.items()] +
                    [["kscope", e(res.kscope_version)]])
    notes = "".join(f"<li>{e(n)}</li>" for n in res.notes)
    body = (head + "<h2>Records</h2>" + recs + "<h2>Attacks</h2><p class='muted'>Share of the produced records each attack "
            "recovers; on the unedited model it shows the attack can find a secret.</p>" + atk +
            "<h3>Per record (unedited → edited)</h3>" + per + "<h2>Where the records are read out</h2>" + trace +
            "<h2>Weights changed</h2>" + w + "<h2>What was preserved and what was scored</h2>" + sizes + kept +
            "<h2>Inputs</h2>" + inputs +
            (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>kscope forget audit</title><style>{STYLE}</style>{CHECK}"
            f"</head><body><h1>kscope forget audit</h1>{body}</body></html>")


def write_page(res, path: str | Path) -> Path:
    return write_text(path, render(res))
