"""The sweep's figure: the verdicts per layer (disagreements between suppress and enhance marked as such), then each
measure against layer, one line per unit set and site (monosemanticity AUROC beside its null, dashed), 95 % bands."""

from __future__ import annotations

import numpy as np

from kscope.analyses.cells import LABELS
from kscope.plots import SITE_MARKERS, UNIT_COLORS, legend_outside, pyplot, save_figure

BASELINE_STYLE = {"basis": (0, (1, 1)), "pca": (0, (5, 1)), "random": (0, (3, 1, 1, 1))}
DISAGREE_COLOR = "#d62728"  # no unit kind's colour: a disagreement is neither side winning


def verdict_mark(says: str, other: str) -> tuple[str, str, str]:
    """``(marker, colour, legend label)`` of one verdict, features against the ``other`` kind."""
    if says == "features better":
        return "o", UNIT_COLORS["feature"], "features better"
    if says.endswith(" better"):
        return "o", UNIT_COLORS.get(other, "#555555"), "the other units better (their colour)"
    if says.startswith("disagree"):
        return "X", DISAGREE_COLOR, "suppress and enhance disagree"
    if says.startswith("equivalent"):
        return "s", "#bdbdbd", says
    return ".", "#bdbdbd", "inconclusive"


def _verdict_panel(ax, result, cells, k: int) -> None:
    """One row per site and comparison (features against each other unit set), one mark per layer."""
    kinds = ["neuron", *result.config.get("baselines", {}).get("baselines", [])]
    rows = [(site, kind) for site in result.sites for kind in kinds]
    for y, (site, kind) in enumerate(rows):
        for c in cells:
            v = c.verdicts.get(f"feature vs {kind}", {}).get(k) if c.site == site else None
            if v is not None:
                mk, color, label = verdict_mark(v.says, kind)
                ax.scatter([c.layer], [y], marker=mk, color=color, s=60 if mk != "." else 30, label=label,
                           facecolors="none" if mk == "s" else color)
    ax.set_yticks(range(len(rows)), [f"{site}: vs {LABELS[kind]}" for site, kind in rows], fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("layer")
    ax.set_title(f"features vs, top-{k} (suppress and enhance apart)")
    seen = dict(zip(*reversed(ax.get_legend_handles_labels())))  # below the panel: to its right is the next one
    if seen:
        ax.legend(list(seen.values()), list(seen), loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize=6, frameon=False)


def _line(ax, xs, ivs, color, label, style="-", alpha=1.0, marker="o"):
    m = [iv.mean if iv and iv.mean is not None else np.nan for iv in ivs]
    lo = [iv.lo if iv and iv.lo is not None else np.nan for iv in ivs]
    hi = [iv.hi if iv and iv.hi is not None else np.nan for iv in ivs]
    ax.plot(xs, m, linestyle=style, marker=marker, color=color, label=label, ms=3, alpha=alpha)
    ax.fill_between(xs, lo, hi, color=color, alpha=0.12 * alpha)


def plot_sweep(result, path) -> None:
    """The verdicts (features against every other unit set, per site and layer), log P'/P of the top-k suppressed and
    enhanced (neurons, features per site, their random and matched random units and the same-site baselines), then
    interpretability, monosemanticity and the width sweep."""
    plt = pyplot()
    cells = [c for c in result.cells if c.selection == result.config["selection"][0] and c.ablation == "error"]
    k = max(result.config["delta_prob"]["ks"])
    panels = [("suppress", f"log P'/P, top-{k} suppressed"), ("enhance", f"log P'/P, top-{k} enhanced")]
    quality = [(a, t) for a, t in (("is", "interpretability score"), ("auroc", "monosemanticity AUROC (dashed: null)"))
               if any(getattr(q, f"{a}_feature") for q in result.quality)]
    n = 1 + len(panels) + len(quality) + (1 if result.widths else 0)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    _verdict_panel(axes[0][0], result, cells, k)
    axes = axes[0][1:]

    def by_layer(site):
        return sorted((c for c in cells if c.site == site), key=lambda c: c.layer)

    for ax, (op, title) in zip(axes, panels):
        nc = by_layer(result.sites[0])
        xs = [c.layer for c in nc]
        _line(ax, xs, [c.units["neuron"].top[op][k].log for c in nc], UNIT_COLORS["neuron"], "neurons")
        for control, style in (("random", "--"), ("matched", ":")):
            if all(getattr(c.units["neuron"], control) for c in nc):
                _line(ax, xs, [getattr(c.units["neuron"], control)[op][k].log for c in nc], UNIT_COLORS["neuron"], f"{control} neurons", style, 0.6)
        for site in result.sites:
            sc = by_layer(site)
            xs, color, mk = [c.layer for c in sc], UNIT_COLORS["feature"], SITE_MARKERS.get(site, "o")
            _line(ax, xs, [c.units["feature"].top[op][k].log for c in sc], color, f"features {site}", marker=mk)
            for control, style in (("random", "--"), ("matched", ":")):
                if all(getattr(c.units["feature"], control) for c in sc):
                    _line(ax, xs, [getattr(c.units["feature"], control)[op][k].log for c in sc], color, f"{control} features {site}",
                          style, 0.6, mk)
            for kind, style in BASELINE_STYLE.items():
                if sc and all(kind in c.units for c in sc):
                    _line(ax, xs, [c.units[kind].top[op][k].log for c in sc], UNIT_COLORS[kind], f"{LABELS[kind]} {site}", style, 0.7, mk)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("layer")
        ax.set_title(title)
    legend_outside(axes[len(panels) - 1], fontsize=6)
    for ax, (attr, title) in zip(axes[len(panels):], quality):
        qs = [q for q in result.quality if getattr(q, f"{attr}_feature") is not None]
        q0 = sorted((q for q in qs if q.site == result.sites[0]), key=lambda q: q.layer)
        _line(ax, [q.layer for q in q0], [getattr(q, f"{attr}_neuron") for q in q0], UNIT_COLORS["neuron"], "neurons")
        if attr == "auroc" and any(q.null_neuron for q in q0):  # the AUROC of activity-matched random units
            _line(ax, [q.layer for q in q0], [q.null_neuron for q in q0], UNIT_COLORS["neuron"], "null neurons", "--", 0.6)
        for site in result.sites:
            qq = sorted((q for q in qs if q.site == site), key=lambda q: q.layer)
            mk = SITE_MARKERS.get(site, "o")
            _line(ax, [q.layer for q in qq], [getattr(q, f"{attr}_feature") for q in qq], UNIT_COLORS["feature"], f"features {site}",
                  marker=mk)
            if attr == "auroc" and any(q.null_feature for q in qq):
                _line(ax, [q.layer for q in qq], [q.null_feature for q in qq], UNIT_COLORS["feature"], f"null features {site}", "--",
                      0.6, mk)
        ax.set_xlabel("layer")
        ax.set_title(title)
        legend_outside(ax, fontsize=6)
    if result.widths:
        ax = axes[-1]
        for site in result.sites:
            pts = sorted((w for w in result.widths if w.site == site), key=lambda w: w.expansion)
            xs, color, mk = [w.expansion for w in pts], UNIT_COLORS["feature"], SITE_MARKERS.get(site, "o")
            _line(ax, xs, [w.effects.top["suppress"][k].log for w in pts], color, f"features {site}", marker=mk)
            for control, style in (("random", "--"), ("matched", ":")):
                if all(getattr(w.effects, control) for w in pts):
                    _line(ax, xs, [getattr(w.effects, control)["suppress"][k].log for w in pts], color, f"{control} features {site}",
                          style, 0.6, mk)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("SAE width (x site width)")
        ax.set_title(f"log P'/P, top-{k} suppressed vs width, layer {result.config['width_layer']}")
        legend_outside(ax, fontsize=6)
    fig.suptitle(f"{result.model}: neurons vs features, {result.n_facts} facts ({result.facts}; {result.split})")
    save_figure(fig, path)
