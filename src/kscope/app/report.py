"""Tables of typed results (for the terminal, the HTML report and the README's Markdown) and the compare figure. Every
table is built once here and rendered three ways; ``report_html`` lays them out as ``index.html``, ``verdicts`` writes
the answers above them."""

from __future__ import annotations

from pathlib import Path


from kscope.analyses.autointerp import InterpretResult
from kscope.analyses.cells import LABELS
from kscope.analyses.faithfulness import FaithfulnessResult
from kscope.analyses.monosemanticity import MonosemanticityResult
from kscope.app.report_sweep import sweep_tables
from kscope.app.tables import Table, ci, fmt, interval_note
from kscope.locate.compare import CompareResult
from kscope.plots import legend_outside, pyplot, save_figure, unit_color
from kscope.app import report_privacy
from kscope.app.report_attacks import pooled_attack_tables
from kscope.app.verdicts import answers, markdown_block


def _centre_note(res: CompareResult) -> str:
    got = {u.effects.ablated_to for by_kind in res.summary.values() for u in by_kind.values() if u.effects is not None}
    if not got:
        return "no edits measured"
    if got == {"mean"}:
        return "every set's edits move a unit to (suppress) or twice as far from (enhance) its mean code over the corpus"
    if got == {"zero"}:
        return "every set's codes zeroed (suppress) or doubled (enhance)"
    return "edit centres differ between sets"


def _compare_summaries(res: CompareResult) -> list:
    return [u.effects for by_kind in res.summary.values() for u in by_kind.values()]


def compare_table(res: CompareResult) -> Table:
    t = Table(f"Effect of editing the top-k units, {res.n_facts} facts, {res.model} ({res.split or 'split not recorded'}; "
              f"{_centre_note(res)}; log P'/P and ΔP/P, mean over facts, {interval_note(_compare_summaries(res))}; "
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
                    f"facts, {interval_note(_compare_summaries(results.compare))})", compare_table(results.compare), "compare.png"))
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
            out += pooled_attack_tables(results.privacy)
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
