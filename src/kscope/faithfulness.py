"""How faithful is a decomposition of a site? SAE vs PCA vs ICA vs random directions.

For each decomposition (all at the SAE's L0): reconstruction MSE / explained variance on held-out
activations, knowledge preservation (answer probability of known facts when the site is replaced by
its reconstruction, relative to the clean model) and ΔProb when each fact's top-k units (by IG) are
ablated with the error term kept.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from kscope.attribution import AttributionConfig, attribute_fact
from kscope.decompositions import ica_units, pca_units, random_units
from kscope.facts import Fact
from kscope.influence import InfluenceConfig, aggregate, fact_delta_prob
from kscope.scoring import answer_probs
from kscope.stats import mean_ci
from kscope.units import Units


@dataclass
class FaithfulnessConfig:
    """Compare the SAE with PCA, ICA and random directions at one site."""

    fit_tokens: int = field(default=20_000, metadata={"help": "Activation tokens to fit PCA/ICA on (held-out 10% for the scores)."})
    ks: list[int] = field(default_factory=lambda: [1, 5, 10], metadata={"help": "Top-k units ablated per fact."})
    ica_iter: int = field(default=300, metadata={"help": "FastICA iterations."})
    attribution_steps: int = field(default=10, metadata={"help": "IG steps when ranking units for ablation."})


def reconstruction_scores(units: Units, acts: torch.Tensor, batch: int = 4096) -> dict:
    """``{"mse", "explained_variance", "l0"}`` of ``decode(encode(x))`` on ``acts`` ``[N, d]`` (pure)."""
    err = tot = 0.0
    l0 = 0.0
    mean = acts.mean(0, keepdim=True)
    with torch.no_grad():
        for i in range(0, acts.shape[0], batch):
            x = acts[i : i + batch]
            u = units.encode(x)
            xh = units.decode(u).float()
            err += float((x - xh).pow(2).sum())
            tot += float((x - mean).pow(2).sum())
            l0 += float((u != 0).sum())
    n = acts.shape[0]
    return {"mse": err / (n * acts.shape[1]), "explained_variance": 1 - err / max(tot, 1e-12), "l0": l0 / n}


def knowledge_preservation(lm, units: Units, facts: Sequence[Fact], p_clean: Sequence[np.ndarray]) -> dict:
    """Answer probability with the site replaced by its reconstruction (no error term), at every position.

    Returns the mean ratio ``P_recon / P_clean`` over facts (CI) and the fraction still top-1.
    """
    recon = lambda x: units.decode(units.encode(x)).to(x.dtype)  # noqa: E731
    ratios, top1 = [], []
    for f, pc in zip(facts, p_clean):
        p, r = answer_probs(lm.model, lm.tokenizer, f.prompts, [f.target_id] * len(f.prompts), {units.site: recon}, positions="all")
        ratios.append(float(np.mean(p.numpy() / np.maximum(pc, 1e-12))))
        top1.append(float((r == 0).float().mean()))
    return {"prob_ratio": mean_ci(ratios), "top1": float(np.mean(top1))}


def build_decompositions(sae_units: Units, acts: torch.Tensor, cfg: FaithfulnessConfig, seed: int = 0) -> list[Units]:
    """PCA, ICA and random directions of the site's width, sparsified to the SAE's L0."""
    site = sae_units.site
    with torch.no_grad():
        k = max(1, int(round(float((sae_units.encode(acts[:2048]) != 0).sum(-1).float().mean()))))
    d = acts.shape[1]
    return [
        pca_units(site, acts, d, k),
        ica_units(site, acts, d, k, seed=seed, max_iter=cfg.ica_iter),
        random_units(site, d, d, k, seed=seed, mean=acts.mean(0)),
    ]


def run_faithfulness(lm, sae_units: Units, acts: torch.Tensor, facts: Sequence[Fact], cfg: FaithfulnessConfig, progress=None) -> dict:
    """Scores for the SAE and the baselines. ``acts``: ``[N, d]`` site activations (fit / held-out split inside)."""
    t0 = time.time()
    n_eval = max(1, acts.shape[0] // 10)
    fit, ev = acts[n_eval:], acts[:n_eval]
    decomps = [sae_units] + build_decompositions(sae_units, fit, cfg)
    p_clean = [answer_probs(lm.model, lm.tokenizer, f.prompts, [f.target_id] * len(f.prompts))[0].numpy() for f in facts]
    acfg = AttributionConfig(steps=cfg.attribution_steps, top_k=max(cfg.ks))
    icfg = InfluenceConfig(ks=list(cfg.ks), ops=["suppress"])
    task = progress.add_task("faithfulness", total=(1 + len(decomps)) * len(facts)) if progress else None
    tops = []  # per fact, per decomposition: ranked units (all decompositions share each IG pass)
    for f in facts:
        tops.append([att.top for att in attribute_fact(lm, f, decomps, acfg)])
        if progress:
            progress.advance(task)
    rows = {}
    for d, units in enumerate(decomps):
        row = {"n_units": units.n_units, **reconstruction_scores(units, ev)}
        row["knowledge"] = knowledge_preservation(lm, units, facts, p_clean)
        per_fact = []
        for f, pc, top in zip(facts, p_clean, tops):
            per_fact.append(fact_delta_prob(lm, f, units, top[d], icfg, pc))
            if progress:
                progress.advance(task)
        row["ablation"] = aggregate(per_fact).get("suppress", {})
        rows[units.kind] = row
    return {"site": sae_units.site.name, "n_facts": len(facts), "n_eval_tokens": int(ev.shape[0]),
            "config": asdict(cfg), "decompositions": rows, "seconds": time.time() - t0}


def plot_faithfulness(result: dict, path) -> None:
    """Bar chart: explained variance, knowledge preservation and top-k ablation ΔProb per decomposition."""
    from kscope.report import pyplot

    plt = pyplot()

    rows = result["decompositions"]
    names = list(rows)
    kmax = str(max(int(k) for k in next(iter(rows.values()))["ablation"])) if rows else "10"
    panels = [
        ("explained variance", [rows[n]["explained_variance"] for n in names]),
        ("P(answer) recon / clean", [rows[n]["knowledge"]["prob_ratio"]["mean"] for n in names]),
        (f"ΔProb, top-{kmax} ablated", [rows[n]["ablation"].get(kmax, rows[n]["ablation"].get(int(kmax), {})).get("mean", np.nan) for n in names]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    colors = ["#2b8cbe" if n == "feature" else "#bbbbbb" for n in names]
    for ax, (title, vals) in zip(axes, panels):
        ax.bar(["SAE" if n == "feature" else n.upper() if n != "random" else "random" for n in names], vals, color=colors)
        ax.set_title(title)
        ax.axhline(0, color="k", lw=0.5)
    fig.suptitle(f"Decompositions of {result['site']} ({result['n_facts']} facts, L0 matched)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
