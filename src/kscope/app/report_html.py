"""``index.html``: the answers first (``verdicts``), then one figure per question, then every table, folded."""

from __future__ import annotations

import html
from pathlib import Path

from kscope.app.report import stage_tables
from kscope.app.verdicts import answers, html_block
from kscope.io import write_text
from kscope.pages import CHECK, STYLE

EXTRA_STYLE = ("#verdicts{border:2px solid #2256a6;border-radius:6px;padding:.4em 1em;margin:1em 0;background:#f7f9fd}"
               ".answer{margin:.6em 0}.answer .q{font-weight:bold}.says{display:inline-block;background:#2256a6;color:#fff;"
               "border-radius:3px;padding:0 6px;margin-right:4px;font-size:90%}figure{margin:1em 0}figcaption{color:#555}"
               "details{margin:.4em 0;border:1px solid #ddd;border-radius:4px;padding:.2em .6em}summary{cursor:pointer}")


def write_html(report_dir: Path, results) -> Path:
    """``index.html``: the verdict block, the answers' figures (each under its question), then a folded section per table."""
    report_dir = Path(report_dir)
    items = answers(results)
    parts = [f"<h1>kscope reproduction: {html.escape(str(results.model))}</h1>", f"<p>{html.escape(results.facts_note)}</p>"]
    if (report_dir / "explorer" / "index.html").exists():
        parts.append('<p><a href="explorer/index.html">Explore facts and units</a> (search every unit and fact)'
                     + (' · <a href="explorer/privacy/index.html">erased people</a> (per person: located units, each '
                        "method's outcome on each secret, the attacks)" if (report_dir / "explorer" / "privacy" / "index.html").exists()
                        else "") + "</p>")
    parts.append(html_block(items))
    shown = []
    figs = []
    for a in items:
        if a.figure and a.figure not in shown and (report_dir / a.figure).exists():
            shown.append(a.figure)
            figs.append(f'<figure><img src="{a.figure}" alt="{html.escape(a.question)}">'
                        f"<figcaption>{html.escape(a.question)}</figcaption></figure>")
    if figs:
        parts += ["<h2>Figures</h2>", *figs]
    parts.append("<h2>Tables</h2>")
    for heading, table, fig in stage_tables(results):
        extra = (f'<img src="{fig}" alt="{html.escape(heading)}">' if fig and fig not in shown and (report_dir / fig).exists()
                 else "")
        parts.append(f"<details><summary>{html.escape(heading)}</summary><p class='muted'>{html.escape(table.title)}</p>"
                     f"{table.html()}{extra}</details>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>kscope report</title><style>{STYLE}{EXTRA_STYLE}</style>"
            f"{CHECK}</head><body>{''.join(parts)}</body></html>")
    return write_text(report_dir / "index.html", page)
