"""The sweep's tables: verdicts by layer band and per cell, each unit set's effects, the edits' sizes and collateral,
interpretability and monosemanticity, other protocols, widths and the SAEs (``report`` renders them)."""

from __future__ import annotations

from kscope.analyses.cells import LABELS, control_key
from kscope.analyses.sweep import SweepResult
from kscope.analyses.verdicts import MARGINS
from kscope.app.tables import Table, ci, cr2_note, fmt, interval_note
from kscope.app.verdicts import tally


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
    what = what or interval_note([s for c in res.cells for s in c.units.values()], plural=True)
    return f"{res.n_facts} facts from {res.n_relations} relations, {res.facts}; {res.split}; {what}"


VERDICT_RULE = (f"verdicts per operation: 'better' when suppress and enhance both favour it (intersection-union p, "
                f"Holm-adjusted per column), 'disagree' when both are significant (Holm per op and column) and opposite, "
                f"'equivalent within ±{MARGINS['log']:g}' nats when TOST says so for both, else 'inconclusive'")


def sweep_effects_table(res: SweepResult, selection: str, ablation: str, op: str = "suppress") -> Table:
    """Per site and layer: log P'/P of each unit set's top-k (and ΔP/P of neurons and features), the controls, and (suppress)
    every unit suppressed."""
    k = max(res.config["delta_prob"]["ks"])
    kinds = list(res.config.get("baselines", {}).get("baselines", []))
    every = op == "suppress"
    t = Table(f"{op} top-{k}: log P'/P per unit set ({_sweep_note(res)}; selection {selection}, ablation {ablation}; random / "
              "matched: random units of the kind, uniform / active and matched on contribution norm"
              + ("; all: every unit suppressed)" if every else ")"),
              ["site", "layer", "neurons", "neurons ΔP/P", "features", "features ΔP/P", *(LABELS[x] for x in kinds),
               "random neurons", "matched neurons", "random features", "matched features",
               *(["all neurons", "all features"] if every else [])])
    for c in sorted((c for c in res.cells if c.selection == selection and c.ablation == ablation), key=lambda c: (c.site, c.layer)):
        n, f = c.units["neuron"], c.units["feature"]
        ctrl = [ci(getattr(u, g)[op][k].log) if getattr(u, g) else "–" for u in (n, f) for g in ("random", "matched")]
        t.rows.append([c.site, c.layer, ci(n.top[op][k].log), ci(n.top[op][k].rel), ci(f.top[op][k].log), ci(f.top[op][k].rel),
                       *(ci(c.units[x].top[op][k].log) if x in c.units else "–" for x in kinds), *ctrl,
                       *([ci(n.all.log if n.all else None), ci(f.all.log if f.all else None)] if every else [])])
    return t


def sweep_size_table(res: SweepResult, selection: str, ablation: str, op: str = "suppress") -> Table | None:
    """Per site and layer, each unit set's top-k edit: its size ‖Δx‖, its effect per unit of size and its collateral on
    other relations' facts (None when the sweep measured none)."""
    k = max(res.config["delta_prob"]["ks"])
    kinds = ["neuron", "feature", *res.config.get("baselines", {}).get("baselines", [])]
    cells = sorted((c for c in res.cells if c.selection == selection and c.ablation == ablation), key=lambda c: (c.site, c.layer))
    if not any(u.top[op][k].dx is not None for c in cells for u in c.units.values()):
        return None
    t = Table(f"{op} top-{k}: the edit's size ‖Δx‖ at the site (at MLP neurons: what the MLP writes) · log P'/P per unit of "
              f"‖Δx‖ · collateral (log P'/P of the same edit on other relations' facts) ({_sweep_note(res)}; selection "
              f"{selection}, ablation {ablation})", ["site", "layer", *(LABELS.get(x, x) for x in kinds)])
    for c in cells:
        row = []
        for x in kinds:
            e = c.units[x].top[op][k] if x in c.units else None
            row.append("–" if e is None or e.dx is None else
                       f"{fmt(e.dx.mean, '.3g')} · {ci(e.per_dx, '+.3f')} · {ci(e.collateral, '+.3f')}")
        t.rows.append([c.site, c.layer, *row])
    return t


CR2_NOTE = cr2_note(plural=True)  # the verdicts' intervals, whatever the cells' marginal ones


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
    out = [sweep_band_table(res), sweep_verdict_table(res, sel, abl), sweep_effects_table(res, sel, abl),
           sweep_effects_table(res, sel, abl, "enhance")]
    out += [t for t in [sweep_size_table(res, sel, abl)] if t is not None]
    if len(res.config["selection"]) * len(res.config["ablation"]) > 1:
        out.append(sweep_protocol_table(res))
    if res.quality:
        out.append(sweep_quality_table(res))
    if res.widths:
        out.append(sweep_width_table(res))
    out.append(sweep_sae_table(res))
    return out
