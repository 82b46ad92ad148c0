"""Tables of typed results (for the terminal, the HTML report and the README's Markdown), the study's figures,
and ``index.html``. Every table is built once here and rendered three ways."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kscope.analyses.autointerp import InterpretResult
from kscope.analyses.faithfulness import FaithfulnessResult
from kscope.analyses.monosemanticity import MonosemanticityResult
from kscope.io import write_text
from kscope.locate.compare import CompareResult
from kscope.plots import pyplot, save_figure
from kscope.privacy.erase import EraseResult
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


def compare_table(res: CompareResult) -> Table:
    t = Table(f"ΔProb, {res.n_facts} facts, {res.model}", ["layer", "op", "k", "neurons", "features"])
    for L, by_kind in res.summary.items():
        n, f = by_kind.get("neuron"), by_kind.get("feature")
        dp_n = (n.delta_prob if n else None) or {}
        dp_f = (f.delta_prob if f else None) or {}
        for op in dp_n or dp_f:
            for k in (dp_n or dp_f)[op]:
                t.rows.append([L, op, k, ci(dp_n.get(op, {}).get(k)), ci(dp_f.get(op, {}).get(k))])
    return t


def faithfulness_table(res: FaithfulnessResult) -> Table:
    t = Table(f"Decompositions of {res.site} ({res.n_facts} facts)",
              ["decomposition", "units", "L0", "explained var.", "P recon/clean", "top-1 kept", "ΔProb top-k ablated"])
    for name, r in res.decompositions.items():
        abl = " / ".join(f"k={k}: {fmt(v.mean)}" for k, v in r.ablation.items())
        t.rows.append([name, r.n_units, fmt(r.l0, ".1f"), fmt(r.explained_variance, ".3f"),
                       fmt(r.knowledge.prob_ratio.mean, ".3f"), fmt(r.knowledge.top1, ".2f"), abl])
    return t


def interpret_table(res: InterpretResult) -> Table:
    t = Table(f"Interpretability score, layer {res.layer}", ["units", "explainer", "n", "IS (Pearson r)"])
    for kind, r in res.results.items():
        t.rows.append([f"{kind}s", r.explainer, len(r.rows), ci(r.summary)])
    return t


def monosemanticity_table(res: MonosemanticityResult) -> Table:
    t = Table(f"Monosemanticity, layer {res.layer}", ["units", "n", "AUROC", "median Cohen's d", "p < 0.05"])
    for kind, r in res.results.items():
        s = r.summary
        if s is None:
            t.rows.append([f"{kind}s", 0, "–", "–", "–"])
            continue
        t.rows.append([f"{kind}s", s.n_units, ci(s.auroc), fmt(s.cohens_d_median, ".2f"), f"{100 * s.frac_significant:.0f} %"])
    return t


def privacy_table(res: EraseResult) -> Table:
    t = Table(f"Erasing {res.n_erased} private facts at layer {res.layer} (weight budget {res.weight_budget})",
              ["method", "units", "weights", "Rel ↑", "Gen ↑", "Loc ↑", "ΔPPL ↓", "exposure ↓"])
    for m, r in res.methods.items():
        t.rows.append([m, len(r.units), r.n_weights, fmt(r.rel, ".2f"), fmt(r.gen, ".2f"), fmt(r.loc, ".2f"),
                       fmt(r.delta_ppl), fmt(r.exposure, ".2f")])
    return t


def plot_compare(result: CompareResult, path) -> None:
    """ΔProb vs k for neurons and features, suppress and enhance, with 95% CIs."""
    plt = pyplot()
    layers = list(result.summary)
    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 3.6), squeeze=False)
    for ax, L in zip(axes[0], layers):
        for kind, color in (("neuron", "#e6550d"), ("feature", "#3182bd")):
            s = result.summary[L].get(kind)
            dp = (s.delta_prob if s else None) or {}
            for op, style in (("suppress", "-"), ("enhance", "--")):
                if op not in dp:
                    continue
                ks = sorted(dp[op])
                m = [dp[op][k].mean for k in ks]
                lo = [dp[op][k].lo if dp[op][k].lo is not None else dp[op][k].mean for k in ks]
                hi = [dp[op][k].hi if dp[op][k].hi is not None else dp[op][k].mean for k in ks]
                ax.plot(ks, m, style, marker="o", color=color, label=f"{kind}s, {op}")
                ax.fill_between(ks, lo, hi, color=color, alpha=0.15)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("top-k units")
        ax.set_ylabel("relative ΔP(answer)")
        ax.set_title(f"layer {L}, {result.n_facts} facts")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_privacy(result: EraseResult, path) -> None:
    """Rel, Gen, Loc and ΔPPL per erasure method."""
    plt = pyplot()
    methods = [m for m in result.methods if m != "none"]
    metrics = [("rel", "Rel ↑"), ("gen", "Gen ↑"), ("loc", "Loc ↑"), ("delta_ppl", "ΔPPL ↓")]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    w = 0.8 / len(metrics)
    for i, (key, label) in enumerate(metrics):
        vals = [getattr(result.methods[m], key) for m in methods]
        ax.bar(np.arange(len(methods)) + i * w, [np.nan if v is None else v for v in vals], w, label=label)
    ax.set_xticks(np.arange(len(methods)) + 0.4 - w / 2, methods)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(f"Erasing {result.n_erased} private facts (layer {result.layer}, {result.weight_budget} weights)")
    ax.legend(fontsize=8, ncol=4)
    save_figure(fig, path)


def stage_tables(results) -> list[tuple[str, Table, str | None]]:
    """``(heading, table, figure file)`` for each stage present in a reproduce result."""
    out = []
    if results.compare:
        out.append(("Neurons vs features: ΔProb of the top-k units (mean relative change of P(answer), 95% CI over facts)",
                    compare_table(results.compare), "compare.png"))
    if results.faithfulness:
        out.append((f"Faithfulness of the decomposition ({results.faithfulness.site})", faithfulness_table(results.faithfulness),
                    "faithfulness.png"))
    if results.interpret:
        out.append(("Interpretability score", interpret_table(results.interpret), "interpret.png"))
    if results.monosemanticity:
        out.append(("Monosemanticity", monosemanticity_table(results.monosemanticity), "monosemanticity.png"))
    if results.privacy:
        out.append((f"Privacy erasure ({results.privacy.n_erased} private facts, weight budget {results.privacy.weight_budget})",
                    privacy_table(results.privacy), "privacy.png"))
    return out


def write_html(report_dir: Path, results) -> Path:
    """``index.html`` with a section per stage: its table and its figure."""
    parts = [f"<h1>kscope reproduction: {html.escape(str(results.model))}</h1>", f"<p>{html.escape(results.facts_note)}</p>"]
    for heading, table, fig in stage_tables(results):
        parts += [f"<h2>{html.escape(heading)}</h2>", table.html()]
        if fig and (Path(report_dir) / fig).exists():
            parts.append(f'<img src="{fig}" alt="{html.escape(heading)}">')
    style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}" \
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}"
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>kscope report</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    return write_text(Path(report_dir) / "index.html", page)


def markdown(results) -> str:
    """The README's result tables from a reproduce result, stamped with what produced them."""
    lines = [f"<!-- kscope {results.kscope_version}: model {results.model}; {results.facts_note} -->"]
    for heading, table, _ in stage_tables(results):
        lines += ["", f"**{heading}**", "", table.markdown()]
    return "\n".join(lines) + "\n"
