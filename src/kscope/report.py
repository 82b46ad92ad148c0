"""Figures for compare / privacy results and the HTML report of ``kscope reproduce``."""

from __future__ import annotations

import html
from pathlib import Path

from kscope.io import write_text


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_compare(result: dict, path) -> None:
    """ΔProb vs k for neurons and features, suppress and enhance, with 95% CIs."""
    plt = pyplot()
    layers = list(result["summary"])
    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 3.6), squeeze=False)
    for ax, L in zip(axes[0], layers):
        for kind, color in (("neuron", "#e6550d"), ("feature", "#3182bd")):
            dp = result["summary"][L].get(kind, {}).get("delta_prob", {})
            for op, style in (("suppress", "-"), ("enhance", "--")):
                if op not in dp:
                    continue
                ks = sorted(dp[op], key=int)
                m = [dp[op][k]["mean"] for k in ks]
                lo = [dp[op][k]["lo"] if dp[op][k]["lo"] is not None else dp[op][k]["mean"] for k in ks]
                hi = [dp[op][k]["hi"] if dp[op][k]["hi"] is not None else dp[op][k]["mean"] for k in ks]
                x = [int(k) for k in ks]
                ax.plot(x, m, style, marker="o", color=color, label=f"{kind}s, {op}")
                ax.fill_between(x, lo, hi, color=color, alpha=0.15)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("top-k units")
        ax.set_ylabel("relative ΔP(answer)")
        ax.set_title(f"layer {L}, {result['n_facts']} facts")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_privacy(result: dict, path) -> None:
    """Rel, Gen, Loc and ΔPPL per erasure method."""
    plt = pyplot()
    import numpy as np

    methods = [m for m in result["methods"] if m != "none"]
    metrics = [("rel", "Rel ↑"), ("gen", "Gen ↑"), ("loc", "Loc ↑"), ("delta_ppl", "ΔPPL ↓")]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    w = 0.8 / len(metrics)
    for i, (key, label) in enumerate(metrics):
        vals = [result["methods"][m][key] if result["methods"][m][key] is not None else np.nan for m in methods]
        ax.bar(np.arange(len(methods)) + i * w, vals, w, label=label)
    ax.set_xticks(np.arange(len(methods)) + 0.4 - w / 2, methods)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(f"Erasing {result['n_erased']} private facts (layer {result['layer']}, {result['weight_budget']} weights)")
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def fmt(v, spec="+.3f") -> str:
    """``v`` formatted, or a dash for None / NaN."""
    return "–" if v is None or v != v else format(v, spec)


def _ci(c: dict | None) -> str:
    if not c:
        return "–"
    if c.get("lo") is None:
        return fmt(c.get("mean"))
    return f"{fmt(c['mean'])} [{fmt(c['lo'])}, {fmt(c['hi'])}]"


def compare_rows(res: dict) -> list[list]:
    rows = []
    for L, by_kind in res["summary"].items():
        n, f = by_kind.get("neuron", {}).get("delta_prob", {}), by_kind.get("feature", {}).get("delta_prob", {})
        for op in n:
            for k in n[op]:
                rows.append([L, op, k, _ci(n[op][k]), _ci(f.get(op, {}).get(k))])
    return rows


def faithfulness_rows(res: dict) -> list[list]:
    rows = []
    for name, r in res["decompositions"].items():
        abl = ", ".join(f"k={k}: {fmt(v['mean'])}" for k, v in r["ablation"].items())
        rows.append([name, r["n_units"], fmt(r["l0"], ".1f"), fmt(r["explained_variance"], ".3f"),
                     fmt(r["knowledge"]["prob_ratio"]["mean"], ".3f"), fmt(r["knowledge"]["top1"], ".2f"), abl])
    return rows


def privacy_rows(res: dict) -> list[list]:
    return [[m, len(r["units"]), r["n_weights"], fmt(r["rel"], ".2f"), fmt(r["gen"], ".2f"), fmt(r["loc"], ".2f"),
             fmt(r["delta_ppl"]), fmt(r["exposure"], ".2f")] for m, r in res["methods"].items()]


def write_html(report_dir: Path, results: dict) -> Path:
    """``index.html`` with a section per stage: its table and its figure."""
    parts = [f"<h1>kscope reproduction: {html.escape(str(results.get('model')))}</h1>",
             f"<p>{html.escape(results.get('facts_note', ''))}</p>"]
    c = results.get("compare")
    if c:
        parts += ["<h2>Neurons vs features: ΔProb of the top-k units</h2>",
                  "<p>Mean relative change of P(answer) with 95% CI over facts.</p>",
                  _table(["layer", "op", "k", "neurons", "features"], compare_rows(c)), '<img src="compare.png">']
    f = results.get("faithfulness")
    if f:
        parts += [f"<h2>Faithfulness of the decomposition ({html.escape(f['site'])})</h2>",
                  _table(["decomposition", "units", "L0", "explained var.", "P recon / clean", "top-1 kept", "ΔProb, top-k ablated"],
                         faithfulness_rows(f)), '<img src="faithfulness.png">']
    i = results.get("interpret")
    if i:
        rows = [[k, r["explainer"], len(r["rows"]), _ci(r["summary"])] for k, r in i["results"].items()]
        parts += ["<h2>Interpretability score</h2>", _table(["units", "explainer", "n", "IS (Pearson r)"], rows),
                  '<img src="interpret.png">']
    m = results.get("monosemanticity")
    if m:
        rows = [[k, r["summary"]["n_units"], _ci(r["summary"]["auroc"]), fmt(r["summary"].get("cohens_d_median"), ".2f"),
                 fmt(r["summary"]["frac_significant"], ".2f")] for k, r in m["results"].items()]
        parts += ["<h2>Monosemanticity</h2>", _table(["units", "n", "AUROC", "median Cohen's d", "frac. p<0.05"], rows),
                  '<img src="monosemanticity.png">']
    p = results.get("privacy")
    if p:
        parts += [f"<h2>Privacy erasure ({p['n_erased']} private facts, weight budget {p['weight_budget']})</h2>",
                  _table(["method", "units", "weights", "Rel", "Gen", "Loc", "ΔPPL", "exposure"], privacy_rows(p)),
                  '<img src="privacy.png">']
    style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}" \
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}"
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>kscope report</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    return write_text(report_dir / "index.html", page)
