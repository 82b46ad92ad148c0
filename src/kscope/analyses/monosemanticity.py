"""Monosemanticity: does a fact's top unit fire on that fact's prompts and not on others?

A unit that fires negative on its fact is as selective as one that fires positive, so each unit is oriented by
the sign of its mean activation on the prompts its units were chosen on (``oriented_auroc``), never on the prompts
it is scored on: orienting on the scored prompts favours units that take either sign (under the null, 2 related
against 24 unrelated prompts score about 0.67 for symmetric units and 0.5 for non-negative ones). With
``--no-holdout`` the two sets are the same prompts and the orientation is in-sample; the result says which.

Per unit: activation at the last token on related prompts (its fact's paraphrases) vs unrelated
prompts (other facts), summarised by Cohen's d, AUROC and a Mann–Whitney U p-value; and the mean
activation over prompt pools with 0–100 % related prompts.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy.stats import mannwhitneyu

from kscope.analyses.common import AnalysisConfig, AnalysisResult, save_outputs, setup
from kscope.config import Config, nested, option
from kscope.errors import KscopeError
from kscope.facts import Fact
from kscope.model.readout import unit_activations
from kscope.plots import legend_outside, pyplot, save_figure, unit_color
from kscope.progress import make_progress
from kscope.stats import Interval, mean_ci
from kscope.units.base import Units
from kscope.units.provision import SAEInfo


@dataclass
class MonosemanticityConfig(Config):
    """Related-vs-unrelated activation tests of each fact's top units."""

    top_units: int = option(3, "Top units per fact (by IG) to test.", min=1)
    n_unrelated: int = option(24, "Unrelated prompts per fact (from other facts).", min=1)
    mix_fracs: list[float] = option(help="Fractions of related prompts in the mixed pools.", factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min=0.0, max=1.0)
    pool_size: int = option(8, "Prompts per mixed pool.", min=1)
    seed: int = option(0, "Sampling seed.")


@dataclass
class UnitSeparation:
    """One unit of one fact: oriented activations (scaled by the unit's max) on related and unrelated prompts; ``sign``
    comes from the fact's selection prompts."""

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


@dataclass
class SeparationSummary:
    n_units: int
    auroc: Interval
    cohens_d: Interval
    cohens_d_median: float | None
    frac_significant: float
    mix_curve: list[float]


@dataclass
class UnitSetSeparation:
    units: str
    rows: list[UnitSeparation]
    summary: SeparationSummary | None


@dataclass
class MonosemanticityResult(AnalysisResult):
    """Related-vs-unrelated separation of each fact's top neurons and top features."""

    kind = "monosemanticity"

    results: dict[str, UnitSetSeparation]
    sae: SAEInfo | None = None
    orientation: str = ""  # which prompts each unit's sign comes from


def orientation_note(holdout: bool) -> str:
    return ("the sign of its mean on the fact's selection prompts (not the ones scored)" if holdout
            else "in-sample: the sign of its mean on the prompts scored (--no-holdout)")


@dataclass
class MonosemanticityJob(AnalysisConfig):
    """Related vs unrelated activation of each fact's top units: Cohen's d, AUROC, Mann-Whitney p, mixed pools."""
    output_name = "monosemanticity"

    monosemanticity: MonosemanticityConfig = nested(MonosemanticityConfig)


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


def unit_monosemanticity(lm, facts: Sequence[Fact], units: Units, top: Sequence[Sequence[int]], cfg: MonosemanticityConfig,
                         selected: Sequence[Fact]) -> UnitSetSeparation:
    """Per fact and unit: separation stats and mix curve. ``top[i]`` = ranked units of ``facts[i]`` (its measured
    prompts are the related ones), chosen on ``selected[i]``'s prompts, which orient each unit."""
    rng = random.Random(cfg.seed)
    rows = []
    for i, f in enumerate(facts):
        others = [p for j, g in enumerate(facts) if j != i and g.object != f.object and g.subject != f.subject for p in g.prompts]
        if not others:
            continue
        unrel = rng.sample(others, min(cfg.n_unrelated, len(others)))
        idx = list(top[i][: cfg.top_units])
        a_rel = unit_activations(lm.model, lm.tokenizer, units, f.prompts)[:, idx].numpy()
        a_un = unit_activations(lm.model, lm.tokenizer, units, unrel)[:, idx].numpy()
        a_sel = unit_activations(lm.model, lm.tokenizer, units, selected[i].prompts)[:, idx].numpy()
        for c, u in enumerate(idx):
            sign = orientation(a_sel[:, c])
            rel, un = sign * a_rel[:, c], sign * a_un[:, c]
            scale = max(float(np.abs(np.concatenate([rel, un])).max()), 1e-12)
            rows.append(UnitSeparation(f.uid, int(u), c, sign, **separation(rel, un),
                                       related=(rel / scale).tolist(), unrelated=(un / scale).tolist(),
                                       mix=[m / scale for m in mix_curve(rel, un, cfg.mix_fracs, cfg.pool_size, rng)]))
    return UnitSetSeparation(units.label, rows, summarize(rows))


def summarize(rows: Sequence[UnitSeparation]) -> SeparationSummary | None:
    if not rows:
        return None
    d = [r.cohens_d for r in rows if r.cohens_d is not None and np.isfinite(r.cohens_d)]
    return SeparationSummary(
        n_units=len(rows),
        auroc=mean_ci([r.auroc for r in rows]),
        cohens_d=mean_ci(d),
        cohens_d_median=float(np.median(d)) if d else None,  # d explodes for units silent off-fact
        frac_significant=float(np.mean([r.mwu_p < 0.05 for r in rows])),
        mix_curve=np.mean([r.mix for r in rows], axis=0).tolist(),
    )


def plot_monosemanticity(results: dict[str, UnitSetSeparation], fracs: Sequence[float], path) -> None:
    """Overlaid histograms (related vs unrelated, normalised per unit) for each unit kind, plus the mix curves."""
    plt = pyplot()
    kinds = list(results)
    fig, axes = plt.subplots(1, len(kinds) + 1, figsize=(4.2 * (len(kinds) + 1), 3.6))
    bins = np.linspace(-1, 1, 41)
    for ax, kind in zip(axes, kinds):
        rows = results[kind].rows
        rel = np.concatenate([r.related for r in rows]) if rows else np.zeros(0)
        un = np.concatenate([r.unrelated for r in rows]) if rows else np.zeros(0)
        ax.hist(un, bins=bins, alpha=0.6, density=True, label="unrelated", color="#999999")
        ax.hist(rel, bins=bins, alpha=0.6, density=True, label="related", color=unit_color(kind))
        s = results[kind].summary
        ax.set_title(f"{kind}s: AUROC {s.auroc.mean if s else float('nan'):.2f}")
        ax.set_xlabel("activation / unit max")
        ax.set_ylabel("density")
        legend_outside(ax)
    ax = axes[-1]
    for kind in kinds:
        s = results[kind].summary
        if s and s.mix_curve:
            ax.plot([100 * f for f in fracs], s.mix_curve, marker="o", label=f"{kind}s", color=unit_color(kind))
    ax.set_xlabel("% related prompts in pool")
    ax.set_ylabel("mean activation / unit max")
    ax.set_title("mixed pools")
    legend_outside(ax)
    save_figure(fig, path)


def run_monosemanticity_job(cfg: MonosemanticityJob) -> MonosemanticityResult:
    with make_progress() as progress:
        s = setup(cfg, progress)
        if len(s.facts) < 2:
            raise KscopeError("monosemanticity needs at least 2 known facts (others serve as unrelated prompts)")
        mcfg = cfg.monosemanticity
        results = {kind: unit_monosemanticity(s.lm, s.facts, units, s.tops[kind], mcfg, s.selected)
                   for kind, units in (("neuron", s.neurons), ("feature", s.features))}
    result = MonosemanticityResult(s.lm.name, cfg.layer, len(s.facts), asdict(mcfg), results, s.sae, orientation_note(cfg.holdout))
    return save_outputs(cfg.out_dir, cfg.output_name, result, lambda path: plot_monosemanticity(results, mcfg.mix_fracs, path))
