"""One table type rendered three ways (terminal, HTML, Markdown), and the number formatters every table uses."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from kscope.stats import Interval


def fmt(v, spec: str = "+.3f") -> str:
    """``v`` formatted, or a dash for None / NaN."""
    return "–" if v is None or v != v else format(v, spec)


def ci(c: Interval | None, spec: str = "+.3f") -> str:
    """One formatter for every interval: ``mean [lo, hi]``."""
    return c.fmt(spec) if c is not None else "–"


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def markdown(self) -> str:
        out = [f"| {' | '.join(self.headers)} |", "|" + "---|" * len(self.headers)]
        out += [f"| {' | '.join(map(str, r))} |" for r in self.rows]
        return "\n".join(out)

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in self.headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def rich(self):
        from rich.table import Table as RichTable

        t = RichTable(title=self.title)
        for h in self.headers:
            t.add_column(h, justify="right")
        for r in self.rows:
            t.add_row(*map(str, r))
        return t


def cr2_note(plural: bool = False) -> str:
    return f"95 % CR2 interval{'s' if plural else ''} over relations (Imbens-Kolesár df)"


def interval_note(summaries, plural: bool = False) -> str:
    """How the intervals of these ``SetSummary``s were made (results from before CR2: the cluster bootstrap)."""
    if {s.intervals for s in summaries if s is not None} == {"CR2"}:
        return cr2_note(plural)
    return f"95 % cluster-bootstrap interval{'s' if plural else ''} over relations"
