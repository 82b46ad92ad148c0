"""The explorer's HTML: a unit page laid out like a feature dashboard (logit effects, activation density, a histogram
with axes, top contexts centred on the activating token, the explanation, the facts it serves), a fact page with its
unit sets side by side on one ΔP scale, and the index with a client-side search over units and facts. Pure
rendering: ``explorer`` computes, this module writes strings."""

from __future__ import annotations

import html
import json

import torch

from kscope.analyses.cells import LABELS
from kscope.pages import CHECK, STYLE
from kscope.plots import unit_color

EXTRA = (".ctxc{display:grid;grid-template-columns:1fr auto 1fr;font-family:monospace;white-space:pre;margin:.2em 0;"
         "border-bottom:1px solid #eee}.ctxc .l{text-align:right;overflow:hidden}.ctxc .r{overflow:hidden}"
         ".ctxc .m{outline:2px solid #222;font-weight:bold}.cols{display:flex;gap:1.5em;flex-wrap:wrap;align-items:flex-start}"
         ".logits td:first-child{font-family:monospace;text-align:left}#q{font-size:120%;width:60%;padding:4px}"
         ".kind{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px}")


def page(title: str, body: str, depth: int = 0, head: str = "") -> str:
    up = "../" * depth
    nav = f'<p class="muted"><a href="{up}index.html">explorer (search)</a> · <a href="{up}../index.html">report</a></p>'
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}{EXTRA}</style>"
            f"{CHECK}{head}</head><body>{nav}<h1>{html.escape(title)}</h1>{body}</body></html>")


def swatch(kind: str) -> str:
    return f'<span class="kind" style="background:{unit_color(kind)}"></span>'


def tok(t: str) -> str:
    return html.escape(t.replace("\n", "↵"))


def shade(tokens: list[str], acts: list[float], peak: float, mark: int | None = None) -> str:
    """Tokens as spans whose background deepens with the activation (orange: positive, blue: negative)."""
    out = []
    for i, (t, a) in enumerate(zip(tokens, acts)):
        alpha = min(1.0, abs(a) / peak) if peak > 0 else 0.0
        color = f"rgba(230,85,13,{alpha:.2f})" if a >= 0 else f"rgba(49,130,189,{alpha:.2f})"
        cls = ' class="m"' if i == mark else ""
        out.append(f'<span{cls} style="background:{color}" title="{a:.3g}">{tok(t)}</span>')
    return "".join(out)


def centred(tokens: list[str], acts: list[float], peak: float, before: int = 14, after: int = 10) -> str:
    """One context centred on its most active token: left part right-aligned, the token outlined, the rest after."""
    t = max(range(len(acts)), key=lambda i: abs(acts[i])) if acts else 0
    lo, hi = max(0, t - before), min(len(tokens), t + after + 1)
    return (f'<div class="ctxc"><span class="l">{shade(tokens[lo:t], acts[lo:t], peak)}</span>'
            f'<span>{shade(tokens[t:t + 1], acts[t:t + 1], peak, 0)}</span>'
            f'<span class="r">{shade(tokens[t + 1:hi], acts[t + 1:hi], peak)}</span></div>')


def histogram(values: torch.Tensor, color: str, bins: int = 30, width: int = 460, height: int = 120) -> str:
    """An inline SVG histogram with labelled axes (activation; tokens) and ticks on both."""
    v = values.float()
    if v.numel() == 0:
        return '<p class="muted">never active on these contexts</p>'
    lo, hi = float(v.min()), float(v.max())
    hi = hi if hi > lo else lo + 1e-6
    counts = torch.histc(v, bins=bins, min=lo, max=hi)
    top = max(1.0, float(counts.max()))
    ml, mb, mt = 46, 34, 6
    w = (width - ml) / bins
    rects = "".join(f'<rect x="{ml + i * w:.1f}" y="{mt + height - height * float(c) / top:.1f}" width="{max(w - 1, 1):.1f}" '
                    f'height="{height * float(c) / top:.1f}" fill="{color}"><title>{float(c):.0f}</title></rect>'
                    for i, c in enumerate(counts))
    base = mt + height
    xt = "".join(f'<line x1="{ml + f * (width - ml):.1f}" y1="{base}" x2="{ml + f * (width - ml):.1f}" y2="{base + 4}" stroke="#444"/>'
                 f'<text x="{ml + f * (width - ml):.1f}" y="{base + 15}" font-size="10" text-anchor="middle">{lo + f * (hi - lo):.3g}</text>'
                 for f in (0, 0.25, 0.5, 0.75, 1))
    yt = "".join(f'<text x="{ml - 4}" y="{mt + height - f * height + 3:.1f}" font-size="10" text-anchor="end">{f * top:.0f}</text>'
                 for f in (0, 0.5, 1))
    axes = (f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{base}" stroke="#444"/><line x1="{ml}" y1="{base}" x2="{width}" y2="{base}" '
            f'stroke="#444"/><text x="{(ml + width) / 2:.0f}" y="{base + 29}" font-size="11" text-anchor="middle">activation</text>'
            f'<text x="11" y="{mt + height / 2:.0f}" font-size="11" text-anchor="middle" transform="rotate(-90 11 {mt + height / 2:.0f})">'
            "tokens</text>")
    return (f'<svg class="hist" width="{width + 30}" height="{base + mb}" role="img"><title>activation histogram</title>'
            f"{rects}{axes}{xt}{yt}</svg>")


def logit_table(top: list[tuple[str, float]], bottom: list[tuple[str, float]]) -> str:
    """The tokens the unit's output direction promotes and suppresses through the unembedding."""
    rows = lambda xs: "".join(f"<tr><td>{tok(t)}</td><td>{v:+.3f}</td></tr>" for t, v in xs)  # noqa: E731
    return (f'<div class="cols logits"><table class="logit-top"><thead><tr><th>promotes</th><th>logit</th></tr></thead>'
            f'<tbody>{rows(top)}</tbody></table><table class="logit-bottom"><thead><tr><th>suppresses</th><th>logit</th></tr>'
            f"</thead><tbody>{rows(bottom)}</tbody></table></div>")


def explanation_html(e) -> str:
    """An interpretability explanation (the token explainer's token weights, or an LLM's text) and its score."""
    if e is None:
        return '<p class="muted">not explained (the unit never fired on the explorer\'s contexts)</p>'
    text, score, who = e
    if isinstance(text, dict):
        text = ", ".join(repr(t) for t in list(text)[:10]) or "(no token with a positive mean activation)"
    return f"<p>explanation ({html.escape(who)}): <b>{html.escape(str(text))}</b>; interpretability score {score:.2f}</p>"


def unit_page(u: dict) -> str:
    """``u``: layer, kind, unit, site, density, peak, logits (top, bottom), hist (tensor), contexts (html list), explanation,
    facts (list of (index, label, IG score, rank, ΔP line))."""
    title = f"{u['kind']} {u['unit']}, layer {u['layer']} · density {100 * u['density']:.2f} %"
    facts = "".join(f'<tr><td style="text-align:left"><a href="../fact-{i}.html">{html.escape(lab)}</a></td><td>{rank}</td>'
                    f"<td>{score:.3g}</td><td>{html.escape(dp)}</td></tr>" for i, lab, score, rank, dp in u["facts"])
    body = (f"<p>{swatch(u['kind'])}{html.escape(LABELS.get(u['kind'], u['kind']))} at {html.escape(u['site'])}; active (|activation| "
            f"> 1 % of its peak) on {100 * u['density']:.2f} % of {u['n_tokens']} corpus tokens; peak |activation| {u['peak']:.3g}</p>"
            f"{explanation_html(u['explanation'])}"
            f"<h2>Logit effects</h2><p class='muted'>W_U · (final norm weight ⊙ direction): {html.escape(u['direction'])}</p>"
            f"{logit_table(*u['logits'])}<h2>Activations on active tokens</h2>{u['hist']}"
            f"<h2>Top-activating contexts</h2>{''.join(u['contexts'])}"
            f"<h2>Top unit of</h2><table><thead><tr><th>fact</th><th>rank</th><th>IG score</th><th>its set's ΔP/P, top-k</th></tr>"
            f"</thead><tbody>{facts}</tbody></table>")
    return page(title, body, depth=1)


def side_by_side(layer: int, entry: dict, link, scale: float) -> str:
    """One layer of a fact: each unit set's top units in columns, then their ΔP/P bars per edit on one scale."""
    kinds = list(entry)
    n = max((len(loc.top) for loc in entry.values()), default=0)
    head = "".join(f"<th colspan=2>{swatch(k)}{html.escape(LABELS.get(k, k))}</th>" for k in kinds)
    rows = ""
    for r in range(n):
        cells = ""
        for k in kinds:
            top = entry[k].top
            cells += (f"<td>{link(layer, k, top[r].unit)}</td><td>{top[r].score:.3g}</td>" if r < len(top) else "<td></td><td></td>")
        rows += f"<tr><td>{r + 1}</td>{cells}</tr>"
    units = f"<table><thead><tr><th>rank</th>{head}</tr></thead><tbody>{rows}</tbody></table>"
    edits = list(dict.fromkeys((op, k) for loc in entry.values() if loc.effects for op, by_k in loc.effects.top.items() for k in by_k))
    if not edits:
        return units
    bar_rows = ""
    for op, k in edits:
        cells = ""
        for kind in kinds:
            e = entry[kind].effects
            v = e.top.get(op, {}).get(k).rel if e and k in e.top.get(op, {}) else None
            if v is None:
                cells += "<td>–</td>"
                continue
            w = 120 * min(1.0, abs(v) / scale) if scale > 0 else 0
            cells += (f"<td style='text-align:left'><span class='bar' style='width:{w:.0f}px;background:{unit_color(kind)};"
                      f"opacity:{1.0 if v < 0 else 0.5}'></span> {v:+.3f}</td>")
        bar_rows += f"<tr><td>{op} top-{k}</td>{cells}</tr>"
    heads = "".join(f"<th>{swatch(k)}{html.escape(LABELS.get(k, k))}</th>" for k in kinds)
    return (f"{units}<p>ΔP(answer)/P when each set's top units are edited (bars on one scale, full width = {scale:.3g}; "
            f"solid: lowers P, faint: raises it):</p><table class='dp'><thead><tr><th>edit</th>{heads}</tr></thead>"
            f"<tbody>{bar_rows}</tbody></table>")


SEARCH_JS = """function kscopeSearch(){var q=document.getElementById('q').value.toLowerCase().split(/\\s+/).filter(Boolean);
var out=[],n=0;for(var i=0;i<KSCOPE_INDEX.length;i++){var e=KSCOPE_INDEX[i],s=e.s,ok=true;
for(var j=0;j<q.length;j++){if(s.indexOf(q[j])<0){ok=false;break}}if(ok){n++;if(out.length<200)out.push(e)}}
var rows=out.map(function(e){return '<tr><td>'+e.t+'</td><td style="text-align:left"><a href="'+e.h+'">'+e.n+'</a></td><td style="text-align:left">'+e.x+'</td></tr>'});
document.getElementById('hits').innerHTML=rows.join('')||'<tr><td colspan=3>no match</td></tr>';
document.getElementById('count').textContent=n+' of '+KSCOPE_INDEX.length+' match'+(n>200?' (first 200 shown)':'')}
window.addEventListener('load',function(){document.getElementById('q').addEventListener('input',kscopeSearch);kscopeSearch()});"""


def search_index(entries: list[dict]) -> str:
    """``search.js``: the entries (type, name, link, detail, and ``s``, the lower-case text searched) as a script a page
    loads from disk (no fetch, so file:// works)."""
    for e in entries:
        e["s"] = " ".join(str(e.get(k, "")) for k in ("t", "n", "x", "k")).lower()
        e["n"], e["x"] = html.escape(e["n"]), html.escape(e["x"])
    return f"var KSCOPE_INDEX={json.dumps(entries, ensure_ascii=False)};\n{SEARCH_JS}\n"


def index_page(intro: str, figs: str) -> str:
    body = (f"{intro}<p><input id='q' type='search' placeholder='search units and facts: e.g. \"L12 feature paris\", "
            f"\"neuron 3071\", \"capital\"' autofocus> <span id='count' class='muted'></span></p>"
            f"<table><thead><tr><th>what</th><th>name</th><th>details</th></tr></thead><tbody id='hits'>"
            f"<tr><td colspan=3>loading…</td></tr></tbody></table>{figs}")
    return page("kscope explorer", body, head='<script src="search.js"></script>')


def heat_map(grid: dict[str, dict[int, float]], caption: str, cell: int = 34) -> str:
    """An inline SVG heat map, layers across and unit sets down: each cell the fact's ΔP/P when that set's top units are
    suppressed (blue: lowers P, orange: raises it; one scale, full colour at the largest |ΔP/P| or 1), its value written
    in it, a missing cell grey. ``grid``: row label (a unit kind, or "kind @ site") -> layer -> value."""
    layers = sorted({L for row in grid.values() for L in row})
    vals = [abs(v) for row in grid.values() for v in row.values() if v == v]
    scale = min(1.0, max(vals, default=1.0)) or 1.0
    shown = {label: LABELS.get(label.split(" @ ")[0], label.split(" @ ")[0]) + label[len(label.split(" @ ")[0]):] for label in grid}
    ml, mt = 26 + 6 * max(map(len, shown.values()), default=10), 22
    width, height = ml + cell * len(layers) + 10, mt + cell * len(grid) + 30
    out = []
    for j, L in enumerate(layers):
        out.append(f'<text x="{ml + (j + 0.5) * cell:.0f}" y="{mt - 6}" font-size="10" text-anchor="middle">{L}</text>')
    for i, (label, row) in enumerate(grid.items()):
        y = mt + i * cell
        kind = label.split(" @ ")[0]
        out.append(f'<rect x="4" y="{y + cell / 2 - 5:.0f}" width="10" height="10" rx="2" fill="{unit_color(kind)}"/>'
                   f'<text x="18" y="{y + cell / 2 + 4:.0f}" font-size="11">{html.escape(shown[label])}</text>')
        for j, L in enumerate(layers):
            v = row.get(L)
            x = ml + j * cell
            if v is None or v != v:
                out.append(f'<rect x="{x}" y="{y}" width="{cell - 1}" height="{cell - 1}" fill="#eee"><title>not measured</title></rect>')
                continue
            a = min(1.0, abs(v) / scale)
            color = f"rgba(49,130,189,{a:.2f})" if v < 0 else f"rgba(230,85,13,{a:.2f})"
            ink = "#fff" if a > 0.6 else "#222"
            out.append(f'<rect x="{x}" y="{y}" width="{cell - 1}" height="{cell - 1}" fill="{color}" stroke="#ccc">'
                       f"<title>{html.escape(label)}, layer {L}: {v:+.3f}</title></rect>"
                       f'<text x="{x + cell / 2:.0f}" y="{y + cell / 2 + 3:.0f}" font-size="9" text-anchor="middle" fill="{ink}">'
                       f"{0.0 if abs(v) < 0.005 else v:+.2f}</text>")
    out.append(f'<text x="{ml + cell * len(layers) / 2:.0f}" y="{height - 6}" font-size="11" text-anchor="middle">layer</text>')
    return (f'<figure class="heat"><svg width="{width}" height="{height}" role="img"><title>ΔP/P across layers</title>'
            f'{"".join(out)}</svg><figcaption class="muted">{html.escape(caption)}; blue: lowers P(answer), orange: raises it, '
            f"full colour at |ΔP/P| = {scale:.2g}; grey: not measured</figcaption></figure>")
