"""Monosemanticity: does a fact's top unit fire on that fact's prompts and not on others?

Units are oriented by the sign of their mean activation on related prompts before testing.

Per unit: activation at the last token on related prompts (its fact's paraphrases) vs unrelated
prompts (other facts), summarised by Cohen's d, AUROC and a Mann–Whitney U p-value; and the mean
activation over prompt pools with 0–100 % related prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.stats import mannwhitneyu

from kscope.facts import Fact
from kscope.scoring import unit_activations
from kscope.stats import mean_ci
from kscope.units import Units


@dataclass
class MonosemanticityConfig:
    """Related-vs-unrelated activation tests of each fact's top units."""

    top_units: int = field(default=3, metadata={"help": "Top units per fact (by IG) to test."})
    n_unrelated: int = field(default=24, metadata={"help": "Unrelated prompts per fact (from other facts)."})
    mix_fracs: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], metadata={"help": "Fractions of related prompts in the mixed pools."})
    pool_size: int = field(default=8, metadata={"help": "Prompts per mixed pool."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})


def cohens_d(a: Sequence[float], b: Sequence[float]) -> float:
    """``(mean(a) - mean(b)) / pooled sd``; 0 when both are constant and equal, ±inf if constant and apart."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    na, nb = len(a), len(b)
    var = ((na - 1) * a.var(ddof=1 if na > 1 else 0) + (nb - 1) * b.var(ddof=1 if nb > 1 else 0)) / max(na + nb - 2, 1)
    diff = a.mean() - b.mean()
    if var <= 0:
        return 0.0 if diff == 0 else float(np.sign(diff) * np.inf)
    return float(diff / np.sqrt(var))


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


def unit_monosemanticity(lm, facts: Sequence[Fact], units: Units, top: Sequence[Sequence[int]], cfg: MonosemanticityConfig) -> dict:
    """Per fact and unit: separation stats and mix curve. ``top[i]`` = ranked units of ``facts[i]``."""
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
        for c, u in enumerate(idx):
            # Orient each unit by its sign on related prompts: a neuron that fires strongly negative
            # on its fact (SiLU/GELU allow it) is as selective as one that fires positive.
            sign = -1.0 if a_rel[:, c].mean() < 0 else 1.0
            rel, un = sign * a_rel[:, c], sign * a_un[:, c]
            scale = max(float(np.abs(np.concatenate([rel, un])).max()), 1e-12)
            rows.append({
                "fact": f.uid, "unit": int(u), "rank": c, "sign": sign, **separation(rel, un),
                "related": (rel / scale).tolist(), "unrelated": (un / scale).tolist(),
                "mix": [m / scale for m in mix_curve(rel, un, cfg.mix_fracs, cfg.pool_size, rng)],
            })
    return {"units": units.label, "rows": rows, "summary": summarize(rows)}


def summarize(rows: Sequence[dict]) -> dict:
    if not rows:
        return {}
    d = [r["cohens_d"] for r in rows if np.isfinite(r["cohens_d"])]
    return {
        "n_units": len(rows),
        "auroc": mean_ci([r["auroc"] for r in rows]),
        "cohens_d": mean_ci(d),
        "cohens_d_median": float(np.median(d)) if d else float("nan"),  # d explodes for units silent off-fact
        "frac_significant": float(np.mean([r["mwu_p"] < 0.05 for r in rows])),
        "mix_curve": np.mean([r["mix"] for r in rows], axis=0).tolist(),
    }


def plot_monosemanticity(results: dict, fracs: Sequence[float], path) -> None:
    """Overlaid histograms (related vs unrelated, normalised per unit) for each unit kind, plus the mix curves."""
    from kscope.report import pyplot

    plt = pyplot()

    kinds = list(results)
    fig, axes = plt.subplots(1, len(kinds) + 1, figsize=(4.2 * (len(kinds) + 1), 3.6))
    bins = np.linspace(-1, 1, 41)
    for ax, kind in zip(axes, kinds):
        rows = results[kind]["rows"]
        rel = np.concatenate([r["related"] for r in rows]) if rows else np.zeros(0)
        un = np.concatenate([r["unrelated"] for r in rows]) if rows else np.zeros(0)
        ax.hist(un, bins=bins, alpha=0.6, density=True, label="unrelated", color="#999999")
        ax.hist(rel, bins=bins, alpha=0.6, density=True, label="related", color="#d7301f")
        s = results[kind]["summary"]
        ax.set_title(f"{kind}s: AUROC {s.get('auroc', {}).get('mean', float('nan')):.2f}")
        ax.set_xlabel("activation / unit max")
        ax.legend()
    ax = axes[-1]
    for kind in kinds:
        curve = results[kind]["summary"].get("mix_curve")
        if curve:
            ax.plot([100 * f for f in fracs], curve, marker="o", label=f"{kind}s")
    ax.set_xlabel("% related prompts in pool")
    ax.set_ylabel("mean activation / unit max")
    ax.set_title("mixed pools")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
