"""Tables of typed results (for the terminal, the HTML report and the README's Markdown) and the compare figure. Every
table is built once here and rendered three ways; ``report_html`` lays them out as ``index.html``, ``verdicts`` writes
the answers above them."""

from __future__ import annotations

from pathlib import Path


from kscope.analyses.autointerp import InterpretResult
from kscope.analyses.cells import LABELS, control_key
from kscope.analyses.verdicts import MARGINS
from kscope.analyses.faithfulness import FaithfulnessResult
from kscope.analyses.monosemanticity import MonosemanticityResult
from kscope.analyses.sweep import SweepResult
from kscope.app.tables import Table, ci, fmt
from kscope.locate.compare import CompareResult
from kscope.plots import legend_outside, pyplot, save_figure, unit_color
from kscope.app import report_privacy
from kscope.app.verdicts import answers, markdown_block, tally


def _centre_note(res: CompareResult) -> str:
    got = {u.effects.ablated_to for by_kind in res.summary.values() for u in by_kind.values() if u.effects is not None}
    if not got:
        return "no edits measured"
    if got == {"mean"}:
        return "every set's edits move a unit to (suppress) or twice as far from (enhance) its mean code over the corpus"
    if got == {"zero"}:
        return "every set's codes zeroed (suppress) or doubled (enhance)"
    return "edit centres differ between sets"


def _interval_note(summaries) -> str:
    """How the intervals of these ``SetSummary``s were made (older results: the cluster bootstrap)."""
    made = {s.intervals for s in summaries if s is not None}
    if made == {"CR2"}:
        return "95 % CR2 interval over relations (Imbens-Kolesár df)"
    return "95 % cluster-bootstrap interval over relations"


def _compare_summaries(res: CompareResult) -> list:
    return [u.effects for by_kind in res.summary.values() for u in by_kind.values()]


def compare_table(res: CompareResult) -> Table:
    t = Table(f"Effect of editing the top-k units, {res.n_facts} facts, {res.model} ({res.split or 'split not recorded'}; "
              f"{_centre_note(res)}; log P'/P and ΔP/P, mean over facts, {_interval_note(_compare_summaries(res))}; "
              "‖Δx‖: the edit's size at the site (at MLP neurons: what the MLP writes), mean over the measured positions; "
              "per ‖Δx‖: log P'/P over ‖Δx‖ per fact; collateral: log P'/P of the same edit on other relations' facts; "
              "random / matched: random units of the set, uniform / active and matched on contribution norm; basis, PCA, "
              "random directions: same-site baselines at the features' site)",
              ["layer", "units", "op", "k", "ΔP/P", "log P'/P", "‖Δx‖", "log P'/P per ‖Δx‖", "collateral log P'/P",
               "random log P'/P", "matched log P'/P"])

    def size(c) -> list[str]:
        return [ci(c.dx, ".3f"), ci(c.per_dx, "+.4f"), ci(c.collateral)]

    for L, by_kind in res.summary.items():
        for kind, u in by_kind.items():
            e = u.effects
            if e is None:
                continue
            for op, by_k in e.top.items():
                for k, c in by_k.items():
                    t.rows.append([L, LABELS.get(kind, kind), op, k, ci(c.rel), ci(c.log), *size(c),
                                   *(ci(g[op][k].log) if g else "–" for g in (e.random, e.matched))])
            if e.all is not None:  # the positive control: every unit of the set suppressed
                t.rows.append([L, LABELS.get(kind, kind), "suppress", "all", ci(e.all.rel), ci(e.all.log), *size(e.all), "–", "–"])
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
    t = Table(f"Interpretability score of the top units, layer {res.layer} (held-out windows, half top-activating, half random; "
              "IS: Pearson r of simulated and true activation over every token, which favours sparse units; detection: AUROC "
              "of the simulation's window maximum, top against random windows (0.5: chance), sparsity-robust; each distinct "
              "unit once; 95 % CR2 interval clustered by fact)",
              ["units", "explainer", "n units (clusters)", "IS (Pearson r)", "detection AUROC"])
    for kind, r in res.results.items():
        t.rows.append([LABELS.get(kind, kind), r.explainer, f"{len(r.rows)} ({r.n_clusters or len(r.rows)})", ci(r.summary),
                       ci(r.detection, ".3f")])
    return t


def monosemanticity_table(res: MonosemanticityResult) -> Table:
    draws = next((s.null.draws for r in res.results.values() if (s := r.summary) and s.null), 0)
    t = Table(f"Monosemanticity, layer {res.layer}: AUROC of related prompts against {res.unrelated or 'unrelated prompts'}, "
              f"each unit oriented on {res.orientation or 'its related prompts'}; null: activity-matched random units of the "
              f"same set ({draws} draws; mean [95 % range of the draws]); AUROC and AUROC − null with 95 % CR2 intervals "
              "clustered by relation",
              ["units", "n units (facts, relations)", "AUROC", "null", "AUROC − null", "p (AUROC = null)", "median Cohen's d", "p < 0.05"])
    for kind, r in res.results.items():
        s = r.summary
        if s is None:
            t.rows.append([LABELS.get(kind, kind), 0, "–", "–", "–", "–", "–", "–"])
            continue
        null = f"{s.null.mean:.3f} [{s.null.lo:.3f}, {s.null.hi:.3f}]" if s.null else "–"
        t.rows.append([LABELS.get(kind, kind), f"{s.n_units} ({s.n_facts}, {s.n_relations})", ci(s.auroc, ".3f"), null,
                       ci(s.excess, "+.3f"), fmt(s.excess_p, ".3f"), fmt(s.cohens_d_median, ".2f"),
                       f"{100 * s.frac_significant:.0f} %"])
    return t


def _verdict_text(v) -> str:
    """A verdict's cell: each op's difference (features − the other units, in strength: positive favours the first)
    and what the verdict says; a one-number verdict (older results) its difference."""
    if v is None:
        return "–"
    if v.ops:
        return f"sup {ci(v.ops['suppress'].diff, '+.2f')} · enh {ci(v.ops['enhance'].diff, '+.2f')}: {v.says}"
    return f"{ci(v.diff, '+.2f')} {v.says}"


def _comparisons(res: SweepResult) -> list[tuple[str, str]]:
    """``(verdict key, column name)`` of features against every other unit set, the paper's comparison first."""
    kinds = list(res.config.get("baselines", {}).get("baselines", []))
    return [("feature vs neuron", "vs MLP neurons (paper)")] + [(f"feature vs {k}", f"vs {LABELS[k]}") for k in kinds]


def _sweep_note(res: SweepResult, what: str | None = None) -> str:
    """The facts, the split and (default: as the cells' marginal intervals were made) the intervals."""
    what = what or _interval_note([s for c in res.cells for s in c.units.values()]).replace("interval ", "intervals ")
    return f"{res.n_facts} facts from {res.n_relations} relations, {res.facts}; {res.split}; {what}"


VERDICT_RULE = (f"verdicts per operation: 'better' when suppress and enhance both favour it (intersection-union p, "
                f"Holm-adjusted per column), 'disagree' when both are significant (Holm per op and column) and opposite, "
                f"'equivalent within ±{MARGINS['log']:g}' nats when TOST says so for both, else 'inconclusive'")


def sweep_effects_table(res: SweepResult, selection: str, ablation: str, op: str = "suppress") -> Table:
    """Per site and layer: log P'/P of each unit set's top-k (and ΔP/P of neurons and features), the controls."""
    k = max(res.config["delta_prob"]["ks"])
    kinds = list(res.config.get("baselines", {}).get("baselines", []))
    t = Table(f"{op} top-{k}: log P'/P per unit set ({_sweep_note(res)}; selection {selection}, ablation {ablation}; random / "
              "matched: random units of the kind, uniform / active and matched on contribution norm; all: every unit suppressed)",
              ["site", "layer", "neurons", "neurons ΔP/P", "features", "features ΔP/P", *(LABELS[x] for x in kinds),
               "random neurons", "matched neurons", "random features", "matched features", "all neurons", "all features"])
    for c in sorted((c for c in res.cells if c.selection == selection and c.ablation == ablation), key=lambda c: (c.site, c.layer)):
        n, f = c.units["neuron"], c.units["feature"]
        ctrl = [ci(getattr(u, g)[op][k].log) if getattr(u, g) else "–" for u in (n, f) for g in ("random", "matched")]
        t.rows.append([c.site, c.layer, ci(n.top[op][k].log), ci(n.top[op][k].rel), ci(f.top[op][k].log), ci(f.top[op][k].rel),
                       *(ci(c.units[x].top[op][k].log) if x in c.units else "–" for x in kinds), *ctrl,
                       ci(n.all.log if n.all else None), ci(f.all.log if f.all else None)])
    return t


CR2_NOTE = "95 % CR2 intervals over relations (Imbens-Kolesár df)"


def sweep_verdict_table(res: SweepResult, selection: str | None = None, ablation: str = "error") -> Table:
    """Per site and layer, one verdict per comparison on suppress and enhance judged apart: each op's difference in
    strength (features − the named units; positive favours features) and the verdict, Holm-adjusted over the column."""
    selection = selection or res.config["selection"][0]
    k = max(res.config["delta_prob"]["ks"])
    comps = _comparisons(res)
    ctrl = [(control_key(k, "matched"), f"{LABELS[k]} vs matched random") for k in ("feature", "neuron")]
    t = Table(f"Verdicts, top-{k}: sup = −log P'/P suppressed, enh = +log P'/P enhanced, features − the named units "
              f"(positive favours features; {VERDICT_RULE}; {_sweep_note(res, CR2_NOTE)}; selection {selection}, "
              f"ablation {ablation})", ["site", "layer", *(name for _, name in comps + ctrl)])
    for c in sorted((c for c in res.cells if c.selection == selection and c.ablation == ablation), key=lambda c: (c.site, c.layer)):
        t.rows.append([c.site, c.layer, *(_verdict_text(c.verdicts[key].get(k)) if key in c.verdicts else "–"
                                          for key, _ in comps + ctrl)])
    return t


COUNTS = "features better / the other units better / disagree / equivalent / inconclusive"


def _counts(says: list[str], names: tuple[str, str]) -> str:
    """How many verdicts say each of ``COUNTS`` (older results' "no difference" counts as inconclusive)."""
    if not says:
        return "–"
    return " / ".join(str(len(keys)) for keys in tally(dict(enumerate(says)), *names))


def sweep_band_table(res: SweepResult) -> Table:
    """The summary: per site, protocol and comparison, how many layers of each band say each of ``COUNTS`` (one
    Holm-adjusted verdict per cell, suppress and enhance judged apart)."""
    k = max(res.config["delta_prob"]["ks"])
    layers = sorted(res.layers)
    thirds = [layers[i * len(layers) // 3 : (i + 1) * len(layers) // 3] for i in range(3)]
    bands = [(f"{b[0]}-{b[-1]}", set(b)) for b in thirds if b]
    t = Table(f"Verdicts by layer band (top-{k}, one verdict per cell; {VERDICT_RULE}; interpretability, detection and "
              f"AUROC − null: one measure each; {COUNTS})", ["site", "selection", "ablation", "features vs", *[name for name, _ in bands]])
    for site, sel, abl in sorted({(c.site, c.selection, c.ablation) for c in res.cells}):
        cells = [c for c in res.cells if (c.site, c.selection, c.ablation) == (site, sel, abl)]
        for key, name in _comparisons(res):
            if not any(key in c.verdicts for c in cells):
                continue
            other = LABELS[key.split(" vs ")[1]]
            says = lambda band: [c.verdicts[key][k].says for c in cells if c.layer in band and key in c.verdicts]  # noqa: E731
            t.rows.append([site, sel, abl, name[3:], *(_counts(says(band), ("features", other)) for _, band in bands)])
    for q_attr, name in (("is", "interpretability score"), ("det", "detection AUROC"), ("auroc", "monosemanticity AUROC − null")):
        qs = [q for q in res.quality if getattr(q, f"{q_attr}_verdict") is not None]
        for site in res.sites if qs else []:
            t.rows.append([site, name, "–", "MLP neurons", *(_counts([getattr(q, f"{q_attr}_verdict").says for q in qs
                                                                     if q.site == site and q.layer in band], ("features", "neurons"))
                                                             for _, band in bands)])
    return t


def sweep_protocol_table(res: SweepResult) -> Table:
    """Per site and layer, features − neurons (suppress and enhance apart) under every selection x ablation protocol
    of the run, and what the reconstruction alone does to log P (the damage reconstruction-mode effects are now
    measured from)."""
    k = max(res.config["delta_prob"]["ks"])
    protos = [(sel, abl) for sel in res.config["selection"] for abl in res.config["ablation"]]
    recon = "reconstruction" in res.config["ablation"]
    t = Table(f"Features − MLP neurons, top-{k}, under each protocol (selection, ablation; sup / enh as in the verdict "
              f"table; {_sweep_note(res, CR2_NOTE)})", ["site", "layer", *[f"{sel}, {abl}" for sel, abl in protos],
                                                      *(["reconstruction alone (log P'/P)"] if recon else [])])
    by = {(c.site, c.layer, c.selection, c.ablation): c for c in res.cells}
    for site, layer in sorted({(c.site, c.layer) for c in res.cells}):
        row = [site, layer, *(_verdict_text(by[(site, layer, sel, abl)].verdicts["feature vs neuron"][k]) for sel, abl in protos)]
        if recon:
            r = by[(site, layer, res.config["selection"][0], "reconstruction")].units["feature"].recon
            row.append(ci(r.log if r else None, "+.2f"))
        t.rows.append(row)
    return t


def sweep_quality_table(res: SweepResult) -> Table:
    """Per site and layer: interpretability (Pearson r and detection AUROC of the distinct top units) and
    monosemanticity (AUROC per fact beside its activity-matched null), neurons and features, with their verdicts."""
    def unit_ci(x) -> str:
        return ci(x, ".2f") + f" (n {x.n})" if x else "–"

    def says(v) -> str:
        return v.says if v else "–"

    t = Table(f"Interpretability and monosemanticity of the top units: 95 % CR2 intervals (IS: Pearson r and detection: AUROC of "
              f"top against random windows, each distinct top unit once, clustered by fact, Welch verdicts; AUROC: per fact, unit "
              f"oriented on {res.orientation or 'its fact'}, clustered by relation, beside its null from activity-matched random "
              f"units); AUROC verdict on AUROC − null, paired over facts; TOST margins ±{MARGINS['is']:g} (IS), "
              f"±{MARGINS['auroc']:g} (detection, AUROC − null); verdicts Holm-adjusted per column",
              ["site", "layer", "IS neurons", "IS features", "IS verdict", "detection neurons", "detection features",
               "detection verdict", "AUROC neurons", "null neurons", "AUROC features", "null features", "AUROC verdict"])
    for q in sorted(res.quality, key=lambda q: (q.site, q.layer)):
        t.rows.append([q.site, q.layer, unit_ci(q.is_neuron), unit_ci(q.is_feature), says(q.is_verdict),
                       ci(q.det_neuron, ".2f"), ci(q.det_feature, ".2f"), says(q.det_verdict),
                       ci(q.auroc_neuron, ".2f"), ci(q.null_neuron, ".2f"), ci(q.auroc_feature, ".2f"), ci(q.null_feature, ".2f"),
                       says(q.auroc_verdict)])
    return t


def sweep_width_table(res: SweepResult) -> Table:
    k = max(res.config["delta_prob"]["ks"])
    t = Table(f"Width sweep at layer {res.config['width_layer']} (log P'/P; random / matched: random features of the same "
              "SAE, uniform / active and matched on contribution norm; all: every feature suppressed)",
              ["site", "width", "features", "explained var.", f"suppress top-{k}", f"enhance top-{k}", f"random suppress {k}",
               f"matched suppress {k}", "all features"])
    for w in sorted(res.widths, key=lambda w: (w.site, w.expansion)):
        e = w.effects
        t.rows.append([w.site, f"{w.expansion}x", w.n_features, fmt(w.explained_variance, ".3f"), ci(e.top["suppress"][k].log),
                       ci(e.top["enhance"][k].log), *(ci(g["suppress"][k].log) if g else "–" for g in (e.random, e.matched)),
                       ci(e.all.log if e.all else None)])
    return t


def sweep_sae_table(res: SweepResult) -> Table:
    t = Table("SAEs of the sweep (held-out statistics)", ["site", "source", "training tokens", "explained var.", "L0", "dead"])
    for name, info in sorted(res.saes.items(), key=lambda kv: (kv[0].split("/")[1], int(kv[0].split("/")[0]))):
        s = info.stats or {}
        t.rows.append([name, info.source, s.get("n_train_tokens", "–"), fmt(s.get("explained_variance"), ".3f"), fmt(s.get("l0"), ".1f"),
                       fmt(s.get("dead_fraction"), ".3f")])
    return t


def sweep_tables(res: SweepResult) -> list[Table]:
    sel, abl = res.config["selection"][0], res.config["ablation"][0]
    out = [sweep_band_table(res), sweep_verdict_table(res, sel, abl), sweep_effects_table(res, sel, abl)]
    if len(res.config["selection"]) * len(res.config["ablation"]) > 1:
        out.append(sweep_protocol_table(res))
    if res.quality:
        out.append(sweep_quality_table(res))
    if res.widths:
        out.append(sweep_width_table(res))
    out.append(sweep_sae_table(res))
    return out


def plot_compare(result: CompareResult, path) -> None:
    """log P'/P vs k for each unit set (top units solid; neurons' and features' random and matched random units
    faint), suppress and enhance, with 95 % intervals; one colour per unit kind, the legend outside the axes."""
    from matplotlib.lines import Line2D

    plt = pyplot()
    layers = list(result.summary)
    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 3.6), squeeze=False)
    kinds: list[str] = []
    for ax, L in zip(axes[0], layers):
        for kind, s in result.summary[L].items():
            color = unit_color(kind)
            kinds += [kind] if kind not in kinds else []
            for attr, marker, alpha in (("top", "o", 1.0), ("random", "x", 0.45), ("matched", "+", 0.45)):
                grid = (getattr(s.effects, attr) if s.effects else None) or {}
                for op, style in (("suppress", "-"), ("enhance", "--")):
                    if op not in grid:
                        continue
                    ks = sorted(grid[op])
                    iv = [grid[op][k].log for k in ks]
                    ax.plot(ks, [i.mean for i in iv], style, marker=marker, color=color, alpha=alpha)
                    ax.fill_between(ks, [i.lo if i.lo is not None else i.mean for i in iv],
                                    [i.hi if i.hi is not None else i.mean for i in iv], color=color, alpha=0.15 * alpha)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("top-k units")
        ax.set_ylabel("log P'(answer) / P(answer)")
        ax.set_title(f"layer {L}, {result.n_facts} facts")
    # the legend says each colour (unit kind) once and each style once: 5 + 5 entries, not one per line
    handles = [Line2D([], [], color=unit_color(k), lw=2) for k in kinds]
    labels = [LABELS.get(k, k) for k in kinds]
    handles += [Line2D([], [], color="k", ls="-"), Line2D([], [], color="k", ls="--"), Line2D([], [], color="k", marker="o", ls=""),
                Line2D([], [], color="k", marker="x", ls="", alpha=0.45), Line2D([], [], color="k", marker="+", ls="", alpha=0.45)]
    labels += ["suppressed", "enhanced", "top units", "random units (faint)", "matched random units (faint)"]
    legend_outside(axes[0][-1], handles, labels)
    save_figure(fig, path)


def stage_tables(results) -> list[tuple[str, Table, str | None]]:
    """``(heading, table, figure file)`` for each stage present in a reproduce result."""
    out = []
    if results.compare:
        out.append(("Neurons, features and same-site baselines: effect of editing the top-k units (log P'/P and ΔP/P, mean over "
                    f"facts, {_interval_note(_compare_summaries(results.compare))})", compare_table(results.compare), "compare.png"))
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
            out.append(("Erasure pooled over privacy models", report_privacy.study_table(results.privacy), None))
            out.append(("Erasure across privacy models: each method's best point", report_privacy.targets_table(results.privacy), None))
            out.append(("Erasure across privacy models: which handle erases more", report_privacy.pooled_verdict_table(results.privacy),
                        None))
        for name, res in results.privacy.items():
            out += report_privacy.tables(name, res)
    return out


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
    """What produced the tables: kscope version, model and facts, a digest of the whole config but where it was written
    (``out``: the same study run into another directory has the same digest), each SAE's identity."""
    import hashlib
    import json

    config = {k: v for k, v in results.config.items() if k != "out"}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]
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
    """The README's result tables from a reproduce result, stamped with what produced them, the answers first."""
    lines = [stamp(results), *markdown_block(answers(results))]
    for heading, table, _ in stage_tables(results):
        lines += ["", f"**{heading}**", "", table.markdown()]
    return "\n".join(lines) + "\n"
