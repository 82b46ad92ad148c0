"""The sweep's figure: each measure against layer, one line per unit set and site, 95 % bands."""

from __future__ import annotations

import numpy as np

from kscope.analyses.cells import LABELS
from kscope.plots import SITE_MARKERS, UNIT_COLORS, legend_outside, pyplot, save_figure

BASELINE_STYLE = {"basis": (0, (1, 1)), "pca": (0, (5, 1)), "random": (0, (3, 1, 1, 1))}


def _line(ax, xs, ivs, color, label, style="-", alpha=1.0, marker="o"):
    m = [iv.mean if iv and iv.mean is not None else np.nan for iv in ivs]
    lo = [iv.lo if iv and iv.lo is not None else np.nan for iv in ivs]
    hi = [iv.hi if iv and iv.hi is not None else np.nan for iv in ivs]
    ax.plot(xs, m, linestyle=style, marker=marker, color=color, label=label, ms=3, alpha=alpha)
    ax.fill_between(xs, lo, hi, color=color, alpha=0.12 * alpha)


def plot_sweep(result, path) -> None:
    """log P'/P of the top-k suppressed and enhanced (neurons, features per site, their random and matched random units
    and the same-site baselines), then interpretability, monosemanticity and the width sweep."""
    plt = pyplot()
    cells = [c for c in result.cells if c.selection == result.config["selection"][0] and c.ablation == "error"]
    k = max(result.config["delta_prob"]["ks"])
    panels = [("suppress", f"log P'/P, top-{k} suppressed"), ("enhance", f"log P'/P, top-{k} enhanced")]
    quality = [(a, t) for a, t in (("is", "interpretability score"), ("auroc", "monosemanticity AUROC"))
               if any(getattr(q, f"{a}_feature") for q in result.quality)]
    n = len(panels) + len(quality) + (1 if result.widths else 0)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    axes = axes[0]

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
        for site in result.sites:
            qq = sorted((q for q in qs if q.site == site), key=lambda q: q.layer)
            _line(ax, [q.layer for q in qq], [getattr(q, f"{attr}_feature") for q in qq], UNIT_COLORS["feature"], f"features {site}",
                  marker=SITE_MARKERS.get(site, "o"))
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
