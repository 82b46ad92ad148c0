"""The privacy figures of a run: where the secrets live (the trace), every point, the equal-budget curves and the
white-box attacks per layer; ``plot_all`` writes them beside the erase result."""

from __future__ import annotations

import numpy as np

from kscope.app.report_attacks import attacked_states, state_label
from kscope.app.report_privacy import _title, build_note
from kscope.privacy.judge.attacks import first_layer
from kscope.plots import UNIT_COLORS, legend_outside, pyplot, save_figure
from kscope.privacy.study import graded
from kscope.privacy.study.results import EraseResult

HANDLE_COLORS = {"keyed-unrestricted": "#000000", "keyed-features": UNIT_COLORS["feature"], "keyed-neurons": UNIT_COLORS["neuron"],
                 "keyed-neurons-params": "#fd8d3c", "keyed-random-directions": "#9ecae1", "keyed-random-columns": "#fdd0a2",
                 "feature-edit": "#31a354"}


def plot_trace(res: EraseResult, path) -> None:
    plt = pyplot()
    tr = res.trace
    if tr.blocks:
        fig, (ax, cx, bx) = plt.subplots(1, 3, figsize=(19, 3.8), gridspec_kw={"width_ratios": [3, 3, 1]})
    else:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    layers = sorted({c.layer for c in tr.cells})
    _layer_panel(ax, layers, [(f"{'zero' if what == 'zero' else 'base MLP'} @ {pos}", color, style,
                               [tr.effect(L, pos, what) for L in layers])
                              for (pos, what), (color, style) in {
                                  ("subject", "zero"): ("#756bb1", "--"), ("subject", "restore"): ("#756bb1", "-"),
                                  ("answer", "zero"): ("#e6550d", "--"), ("answer", "restore"): ("#e6550d", "-")}.items()],
                 tr.band, "#cccccc", "layer (band shaded)", "Δ log P(secret)")
    if tr.blocks:
        blocks = sorted({c.layer for c in tr.blocks})
        _layer_panel(cx, blocks, [(label, "#31a354", style, [tr.block_effect(L, scope) for L in blocks]) for scope, label, style
                                  in (("block", "block L", "-"), ("below", "blocks 0..L", "--"), ("above", "blocks L..last", ":"))],
                     tr.computed, "#c7e9c0", "layer (bottom-up restore's steepest band shaded)",
                     "Δ log P, whole blocks restored to the base model")
    groups = [(g.label, g.dlogp) for g in tr.groups] + ([("band MLPs", tr.band_restore)] if tr.band_restore else [])
    bx.barh([n for n, _ in groups], [iv.mean or 0 for _, iv in groups], color="#999999")
    bx.set_xlabel("Δ log P, restored to the base model")
    fig.suptitle(f"Where the secrets live ({build_note(res)})")
    save_figure(fig, path)


def _layer_panel(ax, layers, series, shaded, shade, xlabel: str, ylabel: str) -> None:
    """A per-layer panel: each ``(label, colour, style, values)`` series over ``layers``, the ``shaded`` layers marked."""
    for label, color, style, values in series:
        ax.plot(layers, values, style, marker="o", ms=3, color=color, label=label)
    for L in shaded:
        ax.axvspan(L - 0.5, L + 0.5, color=shade, alpha=0.4)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    legend_outside(ax)


def plot_budget(res: EraseResult, path) -> None:
    """The equal-budget curves: each keyed handle at each budget, over the strength λ, in (Loc, Rel) and (ΔPPL, Rel)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.4))
    budgets = sorted({p.budget for p in res.points if p.kind in ("keyed", "control") and p.method.startswith("keyed") and p.budget})
    for m, color in HANDLE_COLORS.items():
        for j, b in enumerate(budgets or [0]):
            pts = sorted((p for p in res.points if p.method == m and not p.variant and (p.budget == b or m == "keyed-unrestricted")),
                         key=lambda p: (p.lam or 0, p.tau or 0))
            if m == "feature-edit":
                pts = sorted((p for p in res.points if p.method == m and getattr(p, "layer", None) is None),  # the band only
                             key=lambda p: (p.tau, p.budget))
            if not pts or (m in ("keyed-unrestricted", "feature-edit") and j > 0):
                continue
            alpha = 0.35 + 0.65 * (j + 1) / max(1, len(budgets)) if m not in ("keyed-unrestricted", "feature-edit") else 1.0
            for ax, (x, y) in zip(axes, [("loc", "rel"), ("delta_ppl", "rel"), ("loc", "gen"), ("delta_ppl", "gen")]):
                ax.plot(*_xy(pts, x, y), "-", marker="o", ms=3, color=color, alpha=alpha,
                        label=f"{m} s={b}" if m not in ("keyed-unrestricted", "feature-edit") else m)
    _label_panels(axes, "Loc (min of ParaRel, private) ↑")
    for ax in (axes[1], axes[3]):
        ax.axvline(res.target.delta_ppl, color="k", lw=0.5, ls=":")
    for ax in (axes[0], axes[2]):
        ax.axvline(res.target.loc, color="k", lw=0.5, ls=":")
    axes[0].axhline(res.target.rel, color="k", lw=0.5, ls=":")
    axes[2].axhline(res.target.gen, color="k", lw=0.5, ls=":")
    legend_outside(axes[-1], fontsize=6)
    fig.suptitle(f"Equal budgets through the keyed solver ({_title(res)}); lines join strengths λ, darker = larger budget")
    save_figure(fig, path)


def _xy(pts, x: str, y: str) -> tuple[list[float], list[float]]:
    """A panel's points (missing values as NaN, ΔPPL capped at 10 so one broken model does not flatten the rest)."""
    return ([np.nan if getattr(p, x) is None else min(getattr(p, x), 10.0) for p in pts],
            [np.nan if getattr(p, y) is None else getattr(p, y) for p in pts])


def _label_panels(axes, loc_label: str) -> None:
    """The four panels' axes: Rel and Gen against Loc and ΔPPL (symlog)."""
    for ax, (x, y) in zip(axes, [(loc_label, "Rel ↑"), ("ΔPPL ↓", "Rel ↑"), ("Loc ↑", "Gen ↑"), ("ΔPPL ↓", "Gen ↑")]):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_ylim(-0.05, 1.05)
    for ax in (axes[1], axes[3]):
        ax.set_xscale("symlog", linthresh=0.02)


def plot_points(res: EraseResult, path) -> None:
    """Every method over its budgets: Rel and Gen against Loc and ΔPPL."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.2))
    cmap = plt.get_cmap("tab20")
    for i, (m, v) in enumerate(dict.fromkeys((p.method, p.variant) for p in res.points)):
        pts = [p for p in res.points if p.method == m and p.variant == v]
        for ax, (x, y) in zip(axes, [("loc", "rel"), ("delta_ppl", "rel"), ("loc", "gen"), ("delta_ppl", "gen")]):
            ax.plot(*_xy(pts, x, y), "o", ms=3, color=cmap(i % 20), label=f"{m} {v}".strip())
    _label_panels(axes, "Loc ↑")
    legend_outside(axes[-1], handles=axes[0].get_legend_handles_labels()[0], labels=axes[0].get_legend_handles_labels()[1],
                   fontsize=6, ncol=2)
    fig.suptitle(f"Every point ({_title(res)})")
    save_figure(fig, path)


def plot_all(res: EraseResult, out_dir, prefix: str) -> None:
    """``<prefix>.png`` (every point), ``<prefix>-budget.png`` (the equal-budget curves), ``<prefix>-trace.png``,
    ``<prefix>-whitebox.png`` (the white-box attacks per layer)."""
    from pathlib import Path

    out = Path(out_dir)
    plot_points(res, out / f"{prefix}.png")
    plot_budget(res, out / f"{prefix}-budget.png")
    if res.trace is not None:
        plot_trace(res, out / f"{prefix}-trace.png")
    if any(row.layers for row in res.attacks or []):
        plot_whitebox({prefix: res}, out / f"{prefix}-whitebox.png")


FLOORS = {graded.NEVER_TAUGHT: ("#969696", ":"), graded.TWIN: ("#000000", "--"), graded.UNEDITED: ("#d62728", "-")}
"""The colour and line style of each reference of the white-box figure (``graded.FLOORS``: the model never taught the
secrets, the retain twin, the unedited model)."""


def plot_whitebox(runs: dict[str, EraseResult], path) -> None:
    """Head Projection and Probability Delta per layer (the share of test pairs whose every scored token is a candidate
    at that layer, mean over people), every attacked method beside the never-taught model, the retain twin and the
    unedited model; the band shaded. Several models: the mean over the models that attacked a state, their range shaded."""
    plt = pyplot()
    states = attacked_states(runs)
    attacks = sorted({a for rows in states.values() for r in rows.values() for a in r.layers})
    fig, axes = plt.subplots(1, len(attacks), figsize=(7 * len(attacks), 4.2), squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    several = len(runs) > 1
    for ax, attack in zip(axes[0], attacks):
        for j, (method, rows) in enumerate(states.items()):
            series = [r.layers[attack]["all"] for r in rows.values() if r.layers.get(attack, {}).get("all")]
            if not series:
                continue
            ys = np.array([s[: min(map(len, series))] for s in series])
            color, style = FLOORS.get(method, (HANDLE_COLORS.get(method, cycle[j % len(cycle)]), "-"))
            xs = range(first_layer(attack), first_layer(attack) + ys.shape[1])
            ax.plot(xs, ys.mean(0), style, color=color, lw=1.8 if method in FLOORS else 1.2,
                    marker="o" if method not in FLOORS else None, ms=2.5, label=state_label(method, rows, len(runs)))
            if len(ys) > 1:
                ax.fill_between(xs, ys.min(0), ys.max(0), color=color, alpha=0.12, lw=0)
        for L in next(iter(runs.values())).layers:
            ax.axvspan(L - 0.5, L + 0.5, color="#cccccc", alpha=0.4)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("layer (edited band shaded)")
        ax.set_ylabel(f"{attack}: share of test pairs extracted")
    legend_outside(axes[0][-1])
    res = next(iter(runs.values()))
    fig.suptitle(f"White-box extraction per layer: mean over {len(runs)} privacy models ({', '.join(runs)}), their range "
                 f"shaded; band {','.join(map(str, res.layers))}" if several else f"White-box extraction per layer ({_title(res)})")
    save_figure(fig, path)
