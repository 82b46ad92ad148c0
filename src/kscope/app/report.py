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
from kscope.analyses.sweep import SweepResult
from kscope.app.tables import Table, ci, fmt
from kscope.io import write_text
from kscope.locate.compare import CompareResult
from kscope.plots import pyplot, save_figure
from kscope.app import report_privacy
from kscope.stats import Interval


def compare_table(res: CompareResult) -> Table:
    t = Table(f"ΔProb, {res.n_facts} facts, {res.model}", ["layer", "op", "k", "neurons", "random neurons", "features", "random features"])
    for L, by_kind in res.summary.items():
        n, f = by_kind.get("neuron"), by_kind.get("feature")
        dp = [(getattr(u, a) if u else None) or {} for u in (n, f) for a in ("delta_prob", "random_delta_prob")]
        for op in dp[0] or dp[2]:
            for k in (dp[0] or dp[2])[op]:
                t.rows.append([L, op, k, *(ci(d.get(op, {}).get(k)) for d in dp)])
        if any(u and u.all_delta_prob for u in (n, f)):  # the positive control: every unit of the kind suppressed
            t.rows.append([L, "suppress", "all", ci(n.all_delta_prob if n else None), "–", ci(f.all_delta_prob if f else None), "–"])
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


def _verdict_text(v) -> str:
    if v is None:
        return "–"
    return f"{v.says} ({ci(v.diff)})"


def sweep_verdict_table(res: SweepResult, selection: str | None = None, ablation: str = "error", op: str = "suppress") -> Table:
    """Per site and layer: ΔProb of the top-k features vs neurons (mean over facts), the paired verdict, and the random controls."""
    selection = selection or res.config["selection"][0]
    k = max(res.config["ks"])
    held = "held-out prompts" if res.config.get("holdout") else "in-sample"
    t = Table(f"{op} top-{k}: features vs neurons ({res.n_facts} facts, {res.facts}; selection {selection}, ablation {ablation}, "
              f"{held}; 'all': every unit of the kind suppressed)",
              ["site", "layer", "neurons", "features", "random neurons", "random features", "all neurons", "all features",
               "features − neurons", "verdict"])
    for c in sorted((c for c in res.cells if c.selection == selection and c.ablation == ablation), key=lambda c: (c.site, c.layer)):
        v = c.verdicts[op][k]
        t.rows.append([c.site, c.layer, ci(c.neuron.delta[op][k]), ci(c.feature.delta[op][k]), ci(c.random_neuron.delta[op][k]),
                       ci(c.random_feature.delta[op][k]), ci(c.all_neuron) if op == "suppress" else "–",
                       ci(c.all_feature) if op == "suppress" else "–", ci(v.diff), v.says])
    return t


def sweep_band_table(res: SweepResult) -> Table:
    """The summary: per site, protocol and layer band, how many layers say features better / neurons better / no difference."""
    k = max(res.config["ks"])
    layers = sorted(res.layers)
    thirds = [layers[i * len(layers) // 3 : (i + 1) * len(layers) // 3] for i in range(3)]
    bands = [(f"{b[0]}-{b[-1]}", set(b)) for b in thirds if b]
    t = Table(f"Verdicts by layer band (suppress and enhance top-{k}; features better / neurons better / no difference)",
              ["site", "selection", "ablation", *[name for name, _ in bands]])
    keys = sorted({(c.site, c.selection, c.ablation) for c in res.cells})
    for site, sel, abl in keys:
        row = [site, sel, abl]
        for _, band in bands:
            says = [c.verdicts[op][k].says for c in res.cells if (c.site, c.selection, c.ablation) == (site, sel, abl) and c.layer in band
                    for op in ("suppress", "enhance")]
            row.append(f"{says.count('features better')} / {says.count('neurons better')} / {says.count('no difference')}")
        t.rows.append(row)
    for q_attr, name in (("is", "interpretability score"), ("auroc", "monosemanticity AUROC")):
        qs = [q for q in res.quality if getattr(q, f"{q_attr}_verdict") is not None]
        for site in res.sites:
            row = [site, name, "–"]
            for _, band in bands:
                says = [getattr(q, f"{q_attr}_verdict").says for q in qs if q.site == site and q.layer in band]
                row.append(f"{says.count('features better')} / {says.count('neurons better')} / {says.count('no difference')}" if says else "–")
            if qs:
                t.rows.append(row)
    return t


def sweep_protocol_table(res: SweepResult, op: str = "suppress") -> Table:
    """Per site and layer, features − neurons under every selection x ablation protocol of the run, and what the
    reconstruction alone does (the part of a reconstruction-ablation effect that is not the features')."""
    k = max(res.config["ks"])
    protos = [(sel, abl) for sel in res.config["selection"] for abl in res.config["ablation"]]
    recon = "reconstruction" in res.config["ablation"]
    t = Table(f"{op} top-{k}, features − neurons under each protocol (selection, ablation; {res.n_facts} facts, {res.facts})",
              ["site", "layer", *[f"{sel}, {abl}" for sel, abl in protos], *(["reconstruction alone"] if recon else [])])
    by = {(c.site, c.layer, c.selection, c.ablation): c for c in res.cells}
    for site, layer in sorted({(c.site, c.layer) for c in res.cells}):
        row = [site, layer]
        for sel, abl in protos:
            v = by[(site, layer, sel, abl)].verdicts[op][k]
            row.append(f"{ci(v.diff, '+.2f')} {v.says}")
        if recon:
            row.append(ci(by[(site, layer, res.config["selection"][0], "reconstruction")].recon_only, "+.2f"))
        t.rows.append(row)
    return t


def sweep_quality_table(res: SweepResult) -> Table:
    t = Table("Interpretability score and monosemanticity AUROC of the top units", ["site", "layer", "IS neurons", "IS features",
                                                                                      "IS verdict", "AUROC neurons", "AUROC features",
                                                                                      "AUROC verdict"])
    for q in sorted(res.quality, key=lambda q: (q.site, q.layer)):
        t.rows.append([q.site, q.layer, ci(q.is_neuron, ".2f"), ci(q.is_feature, ".2f"), q.is_verdict.says if q.is_verdict else "–",
                       ci(q.auroc_neuron, ".2f"), ci(q.auroc_feature, ".2f"), q.auroc_verdict.says if q.auroc_verdict else "–"])
    return t


def sweep_width_table(res: SweepResult) -> Table:
    k = max(res.config["ks"])
    t = Table(f"Width sweep at layer {res.config['width_layer']} (random: random features of the same SAE; all: every feature "
              "suppressed)", ["site", "width", "features", "explained var.", f"suppress top-{k}", f"enhance top-{k}",
                              f"random suppress {k}", "all features"])
    for w in sorted(res.widths, key=lambda w: (w.site, w.expansion)):
        t.rows.append([w.site, f"{w.expansion}x", w.n_features, fmt(w.explained_variance, ".3f"), ci(w.delta["suppress"][k]),
                       ci(w.delta["enhance"][k]), ci(w.random_delta["suppress"][k]) if w.random_delta else "–", ci(w.all_delta)])
    return t


def sweep_sae_table(res: SweepResult) -> Table:
    t = Table("SAEs of the sweep (held-out statistics)", ["site", "source", "training tokens", "explained var.", "L0", "dead"])
    for name, info in sorted(res.saes.items(), key=lambda kv: (kv[0].split("/")[1], int(kv[0].split("/")[0]))):
        s = info.stats or {}
        t.rows.append([name, info.source, s.get("n_train_tokens", "–"), fmt(s.get("explained_variance"), ".3f"), fmt(s.get("l0"), ".1f"),
                       fmt(s.get("dead_fraction"), ".3f")])
    return t


def sweep_tables(res: SweepResult) -> list[Table]:
    out = [sweep_band_table(res), sweep_verdict_table(res, res.config["selection"][0], res.config["ablation"][0], "suppress")]
    if len(res.config["selection"]) * len(res.config["ablation"]) > 1:
        out.append(sweep_protocol_table(res))
    if res.quality:
        out.append(sweep_quality_table(res))
    if res.widths:
        out.append(sweep_width_table(res))
    out.append(sweep_sae_table(res))
    return out


def plot_compare(result: CompareResult, path) -> None:
    """ΔProb vs k for neurons and features, suppress and enhance, with 95% CIs."""
    plt = pyplot()
    layers = list(result.summary)
    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 3.6), squeeze=False)
    for ax, L in zip(axes[0], layers):
        for kind, color in (("neuron", "#e6550d"), ("feature", "#3182bd")):
            s = result.summary[L].get(kind)
            for attr, marker, alpha, who in (("delta_prob", "o", 1.0, f"top {kind}s"), ("random_delta_prob", "x", 0.45, f"random {kind}s")):
                dp = (getattr(s, attr) if s else None) or {}
                for op, style in (("suppress", "-"), ("enhance", "--")):
                    if op not in dp:
                        continue
                    ks = sorted(dp[op])
                    m = [dp[op][k].mean for k in ks]
                    lo = [dp[op][k].lo if dp[op][k].lo is not None else dp[op][k].mean for k in ks]
                    hi = [dp[op][k].hi if dp[op][k].hi is not None else dp[op][k].mean for k in ks]
                    ax.plot(ks, m, style, marker=marker, color=color, alpha=alpha, label=f"{who}, {op}")
                    ax.fill_between(ks, lo, hi, color=color, alpha=0.15 * alpha)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("top-k units")
        ax.set_ylabel("relative ΔP(answer)")
        ax.set_title(f"layer {L}, {result.n_facts} facts")
        ax.legend(fontsize=7)
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
    if results.sweep:
        for j, tb in enumerate(sweep_tables(results.sweep)):
            out.append((tb.title, tb, "sweep/sweep.png" if j == 0 else None))
    if results.privacy:
        if len(results.privacy) > 1:
            out.append(("Erasure across privacy models: each method's best point", report_privacy.targets_table(results.privacy), None))
        for name, res in results.privacy.items():
            out += report_privacy.tables(name, res)
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
    from kscope.app.explorer import CHECK

    if (Path(report_dir) / "explorer" / "index.html").exists():
        parts.insert(2, '<p><a href="explorer/index.html">Explore facts and units</a></p>')
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>kscope report</title><style>{style}</style>{CHECK}</head>"
            f"<body>{''.join(parts)}</body></html>")
    return write_text(Path(report_dir) / "index.html", page)


def _saes_of(results) -> dict:
    saes = {}
    if results.compare:
        saes.update({i.site: i for i in results.compare.saes.values()})
    for r in (results.faithfulness, results.interpret, results.monosemanticity):
        if r is not None and r.sae is not None:
            saes[r.sae.site] = r.sae
    if results.sweep:
        saes.update({i.site: i for i in results.sweep.saes.values()})
    for r in results.privacy.values():
        saes.update({f"{i.site} (privacy)": i for i in r.saes.values()})
    return saes


def stamp(results) -> str:
    """What produced the tables: kscope version, model and facts, a digest of the whole config, each SAE's identity."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(results.config, sort_keys=True, default=str).encode()).hexdigest()[:10]
    parts = []
    for name, i in sorted(_saes_of(results).items()):
        s = i.stats or {}
        ev = s.get("explained_variance")
        weights = f", weights {i.weights}" if i.weights else ""
        parts.append(f"{name} {i.key or Path(i.path).name} ({s.get('n_train_tokens', '?')} tokens, "
                     f"EV {ev:.2f}, dead {100 * s.get('dead_fraction', 0):.0f} %{weights})" if ev is not None else f"{name} {i.path}")
    return (f"_kscope {results.kscope_version}; model {results.model}; {results.facts_note}; config {digest}"
            + (f"; SAEs: {'; '.join(parts)}" if parts else "") + "_")


def markdown(results) -> str:
    """The README's result tables from a reproduce result, stamped with what produced them."""
    lines = [stamp(results)]
    for heading, table, _ in stage_tables(results):
        lines += ["", f"**{heading}**", "", table.markdown()]
    return "\n".join(lines) + "\n"
