"""Monosemanticity: does a fact's top unit fire on that fact's prompts and not on others?

A unit that fires negative on its fact is as selective as one that fires positive, so each unit is oriented by
the sign of its mean activation on the prompts its units were chosen on (``oriented_auroc``), never on the prompts
it is scored on: orienting on the scored prompts favours units that take either sign (under the null, 2 related
against 24 unrelated prompts score about 0.67 for symmetric units and 0.5 for non-negative ones). With
``--no-holdout`` the two sets are the same prompts and the orientation is in-sample; the result says which.

Per unit: activation at the last token on related prompts (its fact's paraphrases) vs unrelated prompts (the same
templates filled with other subjects of the relation, ``selectivity.same_template_unrelated``), summarised by Cohen's
d, AUROC and a Mann–Whitney U p-value; the mean activation over prompt pools with 0–100 % related prompts; and the
AUROC of activity-matched random units of the same set (the null, ``selectivity``). Every unit set is scored on the
same prompts: neurons, features and the same-site baselines the job has.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy.stats import mannwhitneyu

from kscope.analyses.common import AnalysisConfig, AnalysisResult, save_outputs, setup
from kscope.analyses.selectivity import NullSummary, activity, matched_units, null_summary, same_template_unrelated
from kscope.config import Config, nested, option
from kscope.errors import KscopeError
from kscope.facts import Fact
from kscope.model.readout import last_token_activations
from kscope.plots import legend_outside, pyplot, save_figure, unit_color
from kscope.progress import make_progress
from kscope.stats import Interval, cluster_robust
from kscope.units.base import Units
from kscope.units.provision import BaselineConfig, SAEInfo


@dataclass
class MonosemanticityConfig(Config):
    """Related-vs-unrelated activation tests of each fact's top units."""

    top_units: int = option(3, "Top units per fact (by IG) to test.", min=1)
    n_unrelated: int = option(24, "Unrelated prompts per fact: its measured templates filled with other subjects of its relation.",
                              min=1)
    mix_fracs: list[float] = option(help="Fractions of related prompts in the mixed pools.", factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min=0.0, max=1.0)
    pool_size: int = option(8, "Prompts per mixed pool.", min=1)
    seed: int = option(0, "Sampling seed.")
    null_draws: int = option(20, "Draws of activity-matched random units of each set (the null).", min=1)


@dataclass
class UnitSeparation:
    """One unit of one fact: oriented activations (scaled by the unit's max) on related and unrelated prompts; ``sign``
    comes from the fact's selection prompts; ``null``: the mean AUROC of its activity-matched random units over draws."""

    fact: str
    unit: int
    rank: int
    sign: float
    cohens_d: float | None
    auroc: float
    mwu_p: float
    related: list[float]
    unrelated: list[float]
    mix: list[float]
    relation: str = ""
    null: float | None = None


@dataclass
class SeparationSummary:
    """Over a set's units: AUROC and AUROC − null with CR2 intervals clustered by relation (a fact's units and a
    relation's facts are not independent); the null's mean and range over draws."""

    n_units: int
    auroc: Interval
    cohens_d: Interval
    cohens_d_median: float | None
    frac_significant: float
    mix_curve: list[float]
    n_facts: int = 0
    n_relations: int = 0
    null: NullSummary | None = None
    excess: Interval | None = None
    excess_p: float | None = None


@dataclass
class UnitSetSeparation:
    units: str
    rows: list[UnitSeparation]
    summary: SeparationSummary | None


@dataclass
class MonosemanticityResult(AnalysisResult):
    """Related-vs-unrelated separation of each fact's top neurons and top features."""

    kind = "monosemanticity"
    version = 2
    min_version = 2
    min_version_why = ("kscope.monosemanticity/1 drew its unrelated prompts from other relations and had no null; run "
                       "kscope monosemanticity again")

    results: dict[str, UnitSetSeparation]
    sae: SAEInfo | None = None
    orientation: str = ""  # which prompts each unit's sign comes from
    unrelated: str = ""  # what the unrelated prompts are
    n_without_unrelated: int = 0  # facts left out: no other subject of their relation


def orientation_note(holdout: bool) -> str:
    return ("the sign of its mean on the fact's selection prompts (not the ones scored)" if holdout
            else "in-sample: the sign of its mean on the prompts scored (--no-holdout)")


@dataclass
class MonosemanticityJob(AnalysisConfig):
    """Related vs unrelated activation of each fact's top units: Cohen's d, AUROC, Mann-Whitney p, mixed pools."""
    output_name = "monosemanticity"

    monosemanticity: MonosemanticityConfig = nested(MonosemanticityConfig)
    baselines: BaselineConfig = nested(BaselineConfig, baselines=[])


def cohens_d(a: Sequence[float], b: Sequence[float]) -> float:
    """``(mean(a) - mean(b)) / pooled sd``; 0 when both are constant and equal, ±inf if constant and apart."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    na, nb = len(a), len(b)
    var = ((na - 1) * a.var(ddof=1 if na > 1 else 0) + (nb - 1) * b.var(ddof=1 if nb > 1 else 0)) / max(na + nb - 2, 1)
    diff = a.mean() - b.mean()
    if var <= 0:
        return 0.0 if diff == 0 else float(np.sign(diff) * np.inf)
    return float(diff / np.sqrt(var))


def orientation(select: Sequence[float]) -> float:
    """-1 if a unit's mean activation on ``select`` is negative, else 1."""
    return -1.0 if float(np.mean(select)) < 0 else 1.0


def oriented_auroc(select: Sequence[float], related: Sequence[float], unrelated: Sequence[float]) -> float:
    """AUROC of related over unrelated activations of a unit oriented on ``select`` (the prompts it was chosen on)."""
    sign = orientation(select)
    return auroc(sign * np.asarray(related, float), sign * np.asarray(unrelated, float))


def auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P(a related activation > an unrelated one), ties count half (the Mann–Whitney statistic / n1 n2)."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    gt = (pos[:, None] > neg[None, :]).sum()
    eq = (pos[:, None] == neg[None, :]).sum()
    return float((gt + 0.5 * eq) / (len(pos) * len(neg)))


def mwu_p(pos: Sequence[float], neg: Sequence[float]) -> float:
    """One-sided Mann–Whitney U p-value for related > unrelated."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if np.all(pos == pos[0]) and np.all(neg == pos[0]):
        return 1.0
    return float(mannwhitneyu(pos, neg, alternative="greater").pvalue)


def separation(pos: Sequence[float], neg: Sequence[float]) -> dict:
    return {"cohens_d": cohens_d(pos, neg), "auroc": auroc(pos, neg), "mwu_p": mwu_p(pos, neg)}


def mix_curve(related: np.ndarray, unrelated: np.ndarray, fracs: Sequence[float], pool: int, rng: random.Random, reps: int = 8) -> list[float]:
    """Mean activation over pools of ``pool`` prompts with each fraction of related ones (averaged over ``reps`` draws)."""
    out = []
    for fr in fracs:
        n_rel = int(round(fr * pool))
        vals = []
        for _ in range(reps):
            r = [related[rng.randrange(len(related))] for _ in range(n_rel)]
            u = [unrelated[rng.randrange(len(unrelated))] for _ in range(pool - n_rel)]
            vals.append(float(np.mean(r + u)))
        out.append(float(np.mean(vals)))
    return out


UNRELATED = "the fact's measured templates filled with other subjects of its relation (another object)"


def unrelated_prompts(facts: Sequence[Fact], n: int, seed: int) -> list[list[str]]:
    """Per fact, its unrelated prompts (``same_template_unrelated``); the same for every unit set."""
    rng = random.Random(seed)
    return [same_template_unrelated(f, facts, n, rng) for f in facts]


def unit_monosemanticity(lm, facts: Sequence[Fact], units: Units, top: Sequence[Sequence[int]], cfg: MonosemanticityConfig,
                         selected: Sequence[Fact], unrelated: Sequence[Sequence[str]] | None = None,
                         acts: tuple[dict[str, int], np.ndarray] | None = None) -> UnitSetSeparation:
    """Per fact and unit: separation stats, mix curve and null. ``top[i]`` = ranked units of ``facts[i]`` (its measured
    prompts are the related ones), chosen on ``selected[i]``'s prompts, which orient each unit. ``acts``: ``(prompt ->
    row, [rows, n_units])`` activations of ``units`` at the last token of every prompt needed, if already at hand."""
    unrelated = unrelated if unrelated is not None else unrelated_prompts(facts, cfg.n_unrelated, cfg.seed)
    if acts is None:
        pool = list(dict.fromkeys(p for i, f in enumerate(facts) for p in [*f.prompts, *unrelated[i], *selected[i].prompts]))
        acts = ({p: j for j, p in enumerate(pool)}, last_token_activations(lm, [units], pool)[0].numpy())
    return score_set(units.label, *acts, facts, selected, unrelated, top, cfg)


def score_set(label: str, index: dict[str, int], acts: np.ndarray, facts: Sequence[Fact], selected: Sequence[Fact],
              unrelated: Sequence[Sequence[str]], top: Sequence[Sequence[int]], cfg: MonosemanticityConfig) -> UnitSetSeparation:
    """``unit_monosemanticity`` from activations ``acts[index[prompt]]`` (pure). Matched units are matched on their
    activity over every prompt in ``index``."""
    mix_rng, null_rng = random.Random(cfg.seed), random.Random(cfg.seed + 1)
    stats = activity(acts)
    rows, null = [], []
    for i, f in enumerate(facts):
        if not unrelated[i]:
            continue
        rel, un, sel = (acts[[index[p] for p in ps]] for ps in (f.prompts, unrelated[i], selected[i].prompts))
        idx = [int(u) for u in top[i][: cfg.top_units]]
        draws = ([matched_units(idx, stats, null_rng, exclude=top[i]) for _ in range(cfg.null_draws)]
                 if acts.shape[1] > len(idx) else [])  # a set of no other units has no null
        for c, u in enumerate(idx):
            sign = orientation(sel[:, u])
            r, n = sign * rel[:, u], sign * un[:, u]
            scale = max(float(np.abs(np.concatenate([r, n])).max()), 1e-12)
            row_null = [oriented_auroc(sel[:, d[c]], rel[:, d[c]], un[:, d[c]]) for d in draws]
            null.append(row_null)
            rows.append(UnitSeparation(f.uid, u, c, sign, **separation(r, n), related=(r / scale).tolist(),
                                       unrelated=(n / scale).tolist(),
                                       mix=[m / scale for m in mix_curve(r, n, cfg.mix_fracs, cfg.pool_size, mix_rng)],
                                       relation=f.relation, null=float(np.mean(row_null)) if row_null else None))
    return UnitSetSeparation(label, rows, summarize(rows, np.asarray(null, float) if null and all(null) else None))


def summarize(rows: Sequence[UnitSeparation], null: np.ndarray | None = None) -> SeparationSummary | None:
    """``null``: ``[len(rows), draws]`` AUROCs of the rows' matched units."""
    if not rows:
        return None
    d = [r.cohens_d for r in rows if r.cohens_d is not None and np.isfinite(r.cohens_d)]
    clusters = [r.relation or r.fact for r in rows]
    d_ci = cluster_robust(d, [c for r, c in zip(rows, clusters) if r.cohens_d is not None and np.isfinite(r.cohens_d)])
    has_null = all(r.null is not None for r in rows)
    excess = cluster_robust([r.auroc - r.null for r in rows], clusters) if has_null else None
    return SeparationSummary(
        n_units=len(rows),
        auroc=cluster_robust([r.auroc for r in rows], clusters).interval,
        cohens_d=d_ci.interval,
        cohens_d_median=float(np.median(d)) if d else None,  # d explodes for units silent off-fact
        frac_significant=float(np.mean([r.mwu_p < 0.05 for r in rows])),
        mix_curve=np.mean([r.mix for r in rows], axis=0).tolist(),
        n_facts=len({r.fact for r in rows}),
        n_relations=len(set(clusters)),
        null=null_summary(null) if null is not None and has_null else None,
        excess=excess.interval if excess else None,
        excess_p=excess.p if excess else None,
    )


def plot_monosemanticity(results: dict[str, UnitSetSeparation], fracs: Sequence[float], path) -> None:
    """Each unit set's AUROC (95 % CR2 interval over relations) beside its null (matched random units: mean, 95 % range
    over draws); related vs unrelated histograms (normalised per unit) of neurons and features; the mix curves."""
    from kscope.analyses.cells import LABELS

    plt = pyplot()
    kinds = list(results)
    hist_kinds = [k for k in ("neuron", "feature") if k in results] or kinds[:2]
    fig, axes = plt.subplots(1, len(hist_kinds) + 2, figsize=(4.2 * (len(hist_kinds) + 2), 3.6))
    ax = axes[0]
    for x, kind in enumerate(kinds):
        s = results[kind].summary
        if s is None:
            continue
        if s.null is not None:
            ax.plot([x, x], [s.null.lo, s.null.hi], color="#999999", lw=6, alpha=0.6, solid_capstyle="butt")
            ax.plot([x - 0.2, x + 0.2], [s.null.mean] * 2, color="#555555", lw=1)
        a = s.auroc
        if a.mean is not None:
            err = [[a.mean - a.lo], [a.hi - a.mean]] if a.lo is not None else None
            ax.errorbar([x], [a.mean], yerr=err, fmt="o", color=unit_color(kind), capsize=3)
    ax.axhline(0.5, color="k", lw=0.5)
    ax.set_xticks(range(len(kinds)), [LABELS.get(k, k) for k in kinds], rotation=30, ha="right")
    ax.set_ylabel("AUROC (related vs unrelated)")
    ax.set_title("top units (dots) vs matched null (grey)")
    bins = np.linspace(-1, 1, 41)
    for ax, kind in zip(axes[1:], hist_kinds):
        rows = results[kind].rows
        rel = np.concatenate([r.related for r in rows]) if rows else np.zeros(0)
        un = np.concatenate([r.unrelated for r in rows]) if rows else np.zeros(0)
        ax.hist(un, bins=bins, alpha=0.6, density=True, label="unrelated", color="#999999")
        ax.hist(rel, bins=bins, alpha=0.6, density=True, label="related", color=unit_color(kind))
        s = results[kind].summary
        ax.set_title(f"{LABELS.get(kind, kind)}: AUROC {s.auroc.mean if s and s.auroc.mean is not None else float('nan'):.2f}")
        ax.set_xlabel("activation / unit max")
        ax.set_ylabel("density")
        legend_outside(ax)
    ax = axes[-1]
    for kind in kinds:
        s = results[kind].summary
        if s and s.mix_curve:
            ax.plot([100 * f for f in fracs], s.mix_curve, marker="o", label=LABELS.get(kind, kind), color=unit_color(kind))
    ax.set_xlabel("% related prompts in pool")
    ax.set_ylabel("mean activation / unit max")
    ax.set_title("mixed pools")
    legend_outside(ax)
    save_figure(fig, path)


def run_monosemanticity_job(cfg: MonosemanticityJob) -> MonosemanticityResult:
    with make_progress() as progress:
        s = setup(cfg, progress, baselines=cfg.baselines)
        if len(s.facts) < 2:
            raise KscopeError("monosemanticity needs at least 2 known facts (others serve as unrelated prompts)")
        mcfg = cfg.monosemanticity
        sets = {"neuron": s.neurons, "feature": s.features, **s.baselines}
        unrelated = unrelated_prompts(s.facts, mcfg.n_unrelated, mcfg.seed)
        pool = list(dict.fromkeys(p for i, f in enumerate(s.facts) for p in [*f.prompts, *unrelated[i], *s.selected[i].prompts]))
        index = {p: j for j, p in enumerate(pool)}
        acts = dict(zip(sets, last_token_activations(s.lm, list(sets.values()), pool, progress)))  # one pass for every set
        results = {kind: unit_monosemanticity(s.lm, s.facts, units, s.tops[kind], mcfg, s.selected, unrelated,
                                              (index, acts[kind].numpy()))
                   for kind, units in sets.items()}
    result = MonosemanticityResult(s.lm.name, cfg.layer, len(s.facts), asdict(mcfg), results, s.sae, orientation_note(cfg.holdout),
                                   UNRELATED, sum(not u for u in unrelated))
    return save_outputs(cfg.out_dir, cfg.output_name, result, lambda path: plot_monosemanticity(results, mcfg.mix_fracs, path))
