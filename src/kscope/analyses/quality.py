"""The sweep's quality cells: interpretability (Pearson r and the detection AUROC) of each layer's top neurons and each
site's top features, and their monosemanticity AUROC beside its activity-matched null.

Interpretability is counted once per distinct unit (facts often share a top unit), so its kinds are compared by
Welch's test over units; each kind's interval is CR2 over clusters of facts (facts sharing a scored unit are one
cluster, as ``analyses.autointerp`` does). Monosemanticity follows ``analyses.monosemanticity``: related prompts are
the fact's measured prompts, unrelated ones the same templates filled with other subjects of its relation
(``selectivity.same_template_unrelated``), each unit oriented on the fact's selection prompts, and the null is the
AUROC of activity-matched random units of the same set. The kinds are compared on AUROC − null (each fact's units
against their own null), paired over facts with CR2 over relations. Every verdict has a TOST margin
(``verdicts.MARGINS``), so it can say "equivalent within ±m" as well as "better" or "inconclusive".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kscope.analyses.autointerp import InterpretConfig, TokenExplainer, fact_clusters, interpretability_score, record_many
from kscope.analyses.monosemanticity import MonosemanticityConfig, score_set, unrelated_prompts
from kscope.analyses.verdicts import MARGINS, Verdict, adjust, paired_verdict, unpaired_verdict
from kscope.facts import Fact
from kscope.model.readout import last_token_activations
from kscope.stats import Interval, cluster_robust
from kscope.units.base import Units
from kscope.units.corpus import CorpusConfig, build_corpus


@dataclass
class QualityCell:
    """One layer x site. ``is_*``: Pearson r and ``det_*``: detection AUROC, over distinct top units (Welch verdicts);
    ``auroc_*``: monosemanticity AUROC and ``null_*``: its activity-matched null, per fact (CR2 over relations), the
    verdict on AUROC − null paired over facts."""

    layer: int
    site: str
    is_neuron: Interval | None = None
    is_feature: Interval | None = None
    is_verdict: Verdict | None = None
    auroc_neuron: Interval | None = None
    auroc_feature: Interval | None = None
    auroc_verdict: Verdict | None = None
    det_neuron: Interval | None = None
    det_feature: Interval | None = None
    det_verdict: Verdict | None = None
    null_neuron: Interval | None = None
    null_feature: Interval | None = None


@dataclass
class UnitScores:
    """One set's distinct scored units: Pearson r, detection AUROC (NaN where undefined) and the facts whose top unit
    each is."""

    score: list[float]
    detection: list[float]
    facts: list[list[str]]


@dataclass
class FactAurocs:
    """One set, per fact (NaN for a fact with no unrelated prompts): the mean AUROC of its top units and the mean AUROC
    of their activity-matched random units (the null)."""

    auroc: list[float]
    null: list[float]


def distinct_scores(ranks: Sequence[Sequence[int]], n: int, score) -> list[float]:
    """``score(unit)`` once per distinct unit among every fact's top ``n`` (``ranks[i]``: fact ``i``'s ranked units)."""
    return [score(u) for u in dict.fromkeys(u for r in ranks for u in r[:n])]


def interpretability(lm, sets: Sequence[Units], ranks: Sequence[Sequence[Sequence[int]]], n: int, icfg: InterpretConfig,
                     ccfg: CorpusConfig, cache_dir: str | None, progress, uids: Sequence[str] = ()) -> list[UnitScores]:
    """Per unit set, the scores of each distinct unit among the facts' top ``n`` (token explainer, on the corpus's
    held-out texts: no SAE saw them). ``ranks[i][s]``: fact ``i``'s ranking of set ``s``; ``uids[i]``: its uid."""
    _, texts = build_corpus(lm, ccfg, progress, cache_dir).split()
    picks = [list(dict.fromkeys(u for r in ranks for u in r[s][:n])) for s in range(len(sets))]
    records = record_many(lm, list(zip(sets, picks)), texts, icfg, progress)
    task = progress.add_task("interpretability", total=len(sets))
    uids = list(uids) or [str(i) for i in range(len(ranks))]
    out = []
    for s, rec in enumerate(records):
        col = {u: c for c, u in enumerate(picks[s])}
        explain = TokenExplainer(icfg.explanation_tokens)
        got = distinct_scores([r[s] for r in ranks], n, lambda u: interpretability_score(rec, col[u], explain, icfg))
        owners = [[uids[i] for i, r in enumerate(ranks) if u in r[s][:n]] for u in picks[s]]
        out.append(UnitScores([g["score"] for g in got],
                              [g["detection"] if g["detection"] is not None else float("nan") for g in got], owners))
        progress.advance(task)
    return out


def monosemanticity(lm, sets: Sequence[Units], measured: Sequence[Fact], selected: Sequence[Fact], ranks: Sequence[Sequence[Sequence[int]]],
                    n: int, n_unrelated: int, seed: int, progress, null_draws: int = 20) -> list[FactAurocs]:
    """Per unit set, per fact: the mean AUROC of its top ``n`` units and of their activity-matched null, scored as
    ``monosemanticity.score_set`` scores them (related = the fact's measured prompts, unrelated = up to ``n_unrelated``
    of its templates filled with other subjects of its relation, each unit oriented on ``selected[i]``'s prompts)."""
    mcfg = MonosemanticityConfig(top_units=n, n_unrelated=n_unrelated, seed=seed, null_draws=null_draws)
    unrelated = unrelated_prompts(measured, n_unrelated, seed)
    pool = list(dict.fromkeys(p for i, f in enumerate(measured) for p in [*f.prompts, *unrelated[i], *selected[i].prompts]))
    index = {p: j for j, p in enumerate(pool)}
    acts = last_token_activations(lm, sets, pool, progress)  # one pass for every set
    out = []
    for s in range(len(sets)):
        got = score_set(sets[s].label, index, acts[s].float().numpy(), measured, selected, unrelated, [r[s] for r in ranks], mcfg)
        per: dict[str, list[tuple[float, float]]] = {}
        for row in got.rows:
            per.setdefault(row.fact, []).append((row.auroc, row.null if row.null is not None else float("nan")))
        mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
        out.append(FactAurocs([mean([a for a, _ in per.get(f.uid, [])]) for f in measured],
                              [mean([b for _, b in per.get(f.uid, [])]) for f in measured]))
    return out


def _excess(a: FactAurocs) -> list[float]:
    return [x - y for x, y in zip(a.auroc, a.null)]


def quality_cells(layers: Sequence[int], sites: Sequence[str], index: dict[str, int], is_scores: list[UnitScores] | None,
                  aurocs: list[FactAurocs] | None, clusters: Sequence[str]) -> list[QualityCell]:
    """One cell per layer and site from per-set values (``index``: set name -> position; ``clusters``: each fact's
    relation); Holm over each measure's table, TOST within ``MARGINS["is"]`` (Pearson r) or ``MARGINS["auroc"]``
    (detection AUROC; AUROC − null)."""
    out = []
    for L in layers:
        ns = index[f"{L}/mlp.neurons/neuron"]
        for site in sites:
            fs = index[f"{L}/{site}/feature"]
            q = QualityCell(L, site)
            if is_scores is not None:
                n, f = is_scores[ns], is_scores[fs]
                cn, cf = fact_clusters(n.facts), fact_clusters(f.facts)
                q.is_neuron, q.is_feature = cluster_robust(n.score, cn).interval, cluster_robust(f.score, cf).interval
                q.det_neuron, q.det_feature = cluster_robust(n.detection, cn).interval, cluster_robust(f.detection, cf).interval
                q.is_verdict = unpaired_verdict(f.score, n.score, margin=MARGINS["is"])
                q.det_verdict = unpaired_verdict(f.detection, n.detection, margin=MARGINS["auroc"])
            if aurocs is not None:
                n, f = aurocs[ns], aurocs[fs]
                q.auroc_neuron, q.auroc_feature = cluster_robust(n.auroc, clusters).interval, cluster_robust(f.auroc, clusters).interval
                q.null_neuron, q.null_feature = cluster_robust(n.null, clusters).interval, cluster_robust(f.null, clusters).interval
                en, ef = _excess(n), _excess(f)
                keep = [i for i in range(len(clusters)) if en[i] == en[i] and ef[i] == ef[i]]  # facts both kinds scored
                q.auroc_verdict = paired_verdict([ef[i] for i in keep], [en[i] for i in keep], [clusters[i] for i in keep],
                                                 margin=MARGINS["auroc"])
            out.append(q)
    for attr in ("is_verdict", "det_verdict", "auroc_verdict"):
        adjust(getattr(q, attr) for q in out if getattr(q, attr) is not None)
    return out
