"""The sweep's quality cells: interpretability score and monosemanticity AUROC of each layer's top neurons and
each site's top features.

Interpretability is counted once per distinct unit (facts often share a top unit), so its kinds are compared by
Welch's test over units. Monosemanticity is per fact (related prompts are the fact's measured prompts, unrelated
ones other facts'), each unit oriented on the fact's selection prompts, and compared paired over facts with a
cluster bootstrap over relations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from kscope.analyses.autointerp import InterpretConfig, TokenExplainer, interpretability_score, record_many
from kscope.analyses.monosemanticity import oriented_auroc
from kscope.analyses.verdicts import Verdict, adjust, paired_verdict, unpaired_verdict
from kscope.facts import Fact
from kscope.model.readout import last_token_activations
from kscope.stats import Interval, cluster_bootstrap, mean_ci
from kscope.units.base import Units
from kscope.units.corpus import CorpusConfig, build_corpus


@dataclass
class QualityCell:
    """Interpretability score (over distinct top units) and monosemanticity AUROC (over facts) of one layer x site."""

    layer: int
    site: str
    is_neuron: Interval | None = None
    is_feature: Interval | None = None
    is_verdict: Verdict | None = None
    auroc_neuron: Interval | None = None
    auroc_feature: Interval | None = None
    auroc_verdict: Verdict | None = None


def distinct_scores(ranks: Sequence[Sequence[int]], n: int, score) -> list[float]:
    """``score(unit)`` once per distinct unit among every fact's top ``n`` (``ranks[i]``: fact ``i``'s ranked units)."""
    return [score(u) for u in dict.fromkeys(u for r in ranks for u in r[:n])]


def interpretability(lm, sets: Sequence[Units], ranks: Sequence[Sequence[Sequence[int]]], n: int, icfg: InterpretConfig,
                     ccfg: CorpusConfig, cache_dir: str | None, progress) -> list[list[float]]:
    """Per unit set, the interpretability score of each distinct unit among the facts' top ``n`` (token explainer,
    on the corpus's held-out texts: no SAE saw them). ``ranks[i][s]``: fact ``i``'s ranking of set ``s``."""
    _, texts = build_corpus(lm, ccfg, progress, cache_dir).split()
    picks = [list(dict.fromkeys(u for r in ranks for u in r[s][:n])) for s in range(len(sets))]
    records = record_many(lm, list(zip(sets, picks)), texts, icfg, progress)
    task = progress.add_task("interpretability", total=len(sets))
    out = []
    for s, rec in enumerate(records):
        col = {u: c for c, u in enumerate(picks[s])}
        explain = TokenExplainer(icfg.explanation_tokens)
        out.append(distinct_scores([r[s] for r in ranks], n, lambda u: interpretability_score(rec, col[u], explain, icfg)["score"]))
        progress.advance(task)
    return out


def monosemanticity(lm, sets: Sequence[Units], measured: Sequence[Fact], selected: Sequence[Fact], ranks: Sequence[Sequence[Sequence[int]]],
                    n: int, n_unrelated: int, rng: random.Random, progress) -> list[list[float]]:
    """Per unit set, per fact: the mean AUROC of its top ``n`` units, related = the fact's measured prompts, unrelated =
    up to ``n_unrelated`` measured prompts of facts with another subject and object, each unit oriented on the fact's
    selection prompts (``selected[i]``)."""
    prompts = [p for f in measured for p in f.prompts]
    owner = [i for i, f in enumerate(measured) for _ in f.prompts]
    sel_prompts = [p for f in selected for p in f.prompts]
    sel_owner = torch.as_tensor([i for i, f in enumerate(selected) for _ in f.prompts])
    acts = last_token_activations(lm, sets, prompts, progress)
    sel_acts = last_token_activations(lm, sets, sel_prompts, progress)
    owner_t = torch.as_tensor(owner)
    picks = []  # per fact: (related rows, unrelated rows, selection rows), the same for every set
    for i, f in enumerate(measured):
        others = [j for j, o in enumerate(owner) if measured[o].object != f.object and measured[o].subject != f.subject]
        unrel = rng.sample(others, min(n_unrelated, len(others))) if others else []
        picks.append((torch.nonzero(owner_t == i).flatten().tolist(), unrel, torch.nonzero(sel_owner == i).flatten().tolist()))
    out = []
    for s in range(len(sets)):
        a, sa = acts[s].float().numpy(), sel_acts[s].float().numpy()
        vals = []
        for i, (rel, unrel, sel) in enumerate(picks):
            vals.append(float(np.mean([oriented_auroc(sa[sel, u], a[rel, u], a[unrel, u]) for u in ranks[i][s][:n]]))
                        if unrel else float("nan"))
        out.append(vals)
    return out


def quality_cells(layers: Sequence[int], sites: Sequence[str], index: dict[str, int], is_scores: list[list[float]] | None,
                  aurocs: list[list[float]] | None, clusters: Sequence[str], n_boot: int, seed: int = 0) -> list[QualityCell]:
    """One cell per layer and site from per-set values (``index``: set name -> position); Holm over each measure's table."""
    out = []
    for L in layers:
        ns = index[f"{L}/mlp.neurons/neuron"]
        for site in sites:
            fs = index[f"{L}/{site}/feature"]
            q = QualityCell(L, site)
            if is_scores is not None:
                q.is_neuron, q.is_feature = mean_ci(is_scores[ns]), mean_ci(is_scores[fs])
                q.is_verdict = unpaired_verdict(is_scores[fs], is_scores[ns])
            if aurocs is not None:
                q.auroc_neuron, q.auroc_feature = (cluster_bootstrap(aurocs[j], clusters, n_boot, seed).interval for j in (ns, fs))
                q.auroc_verdict = paired_verdict(aurocs[fs], aurocs[ns], clusters, n_boot=n_boot, seed=seed)
            out.append(q)
    for attr in ("is_verdict", "auroc_verdict"):
        adjust(getattr(q, attr) for q in out if getattr(q, attr) is not None)
    return out
