"""What ``privacy erase`` records: every (editor, budget, strength) point, the trace of where the secrets live, how
specific the location is, the equal-budget verdicts of features against neurons, the attacks and the targets."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kscope.privacy.judge.attacks import AttackRow
from kscope.privacy.locate.fit import SAEFit
from kscope.privacy.locate.scores import SpecificityEffect
from kscope.privacy.locate.trace import SecretTrace
from kscope.results import Result
from kscope.stats import Interval, mean_ci
from kscope.units.provision import SAEInfo


@dataclass
class LeakCompare:
    """One partial-leak measure of the test secrets, edited against the retain twin (means over people), and the share of
    secrets on which the edited model leaks no more than the twin."""

    edited: Interval
    retain: Interval
    no_more: float


@dataclass
class RetainComparison:
    """A model state against the retain twin on the test people's secrets (held-out edit prompt and held-out phrasings):
    the secret's rank among candidates of its format for both and their two-sided gap ``|rank - retain| / candidates``,
    TOFU's forget quality (KS p-value of the per-secret truth ratios), the partial-leak measures, and the share of
    secrets that leak no more than the twin on every measure."""

    rank: Interval
    retain_rank: Interval
    rank_gap: Interval
    forget_quality: float | None
    leaks: dict[str, LeakCompare] = field(default_factory=dict)
    erased_share: float | None = None
    truth: list[float] = field(default_factory=list)  # per test secret: the truth ratio, edited and twin (for pooling)
    retain_truth: list[float] = field(default_factory=list)
    erased: list[bool] = field(default_factory=list)  # per test secret: leaks no more than the twin on every measure


@dataclass
class SecretOutcome:
    """One test secret under one model state (the privacy pages' per-secret rows): still produced by greedy decoding on
    its held-out edit template (``rel``), the share of its held-out phrasings that still produce it (``gen``), its rank
    among candidates of its format, and the partial-leak measures (``graded.LEAKS``)."""

    person: str
    attribute: str
    rel: bool
    gen: float | None
    rank: int | None = None
    candidates: int | None = None
    leaks: dict[str, float] = field(default_factory=dict)


@dataclass
class ErasurePoint:
    """One editor at one budget and strength (controls too), measured out of sample on the **test** split: Rel on each
    erased secret's held-out edit template, Gen on its held-out phrasings, Loc on kept people and known facts the solver
    never preserved, ΔPPL on held-out text. ``val``: the same measures on the validation split (where a method's best
    point is chosen); ``fit``: the in-sample rates on what the edit was fitted to (key prompts, preserved people and
    facts), kept to show the gap, never graded. ``dlogp``: the change of log P(secret) on the held-out edit template,
    a mean over test people with its interval; ``retain``: (best points) the test secrets against the retain twin.
    ``params``: the edit's degrees of freedom (keyed edits: s x d_mlp for s directions, d_model x n for n columns);
    ``n_weights``: entries of the down projections that differ from the model's."""

    method: str
    kind: str  # keyed, neuron, feature or control
    budget: int
    n_units: int
    n_weights: int
    rel: float | None
    gen: float | None
    loc_pararel: float | None
    loc_private: float | None
    loc: float | None
    ppl: float
    delta_ppl: float
    dlogp: Interval
    rank: Interval | None = None
    delta_ppl_ci: Interval | None = None  # ΔPPL with a paired bootstrap interval over the test texts
    params: int = 0
    lam: float | None = None
    tau: float | None = None
    variant: str = ""  # e.g. "raw location" (no specificity steps)
    draw: int = 0  # random controls: which draw
    expressible: float | None = None  # keyed: share of the target ‖R‖² the handle can hold at the keys (solver.expressible)
    rel_people: dict[str, float] = field(default_factory=dict)  # test people
    dlogp_people: dict[str, float] = field(default_factory=dict)
    gen_people: dict[str, float] = field(default_factory=dict)
    by_layer: dict[int, int] = field(default_factory=dict)
    units: list[list[int]] = field(default_factory=list)
    val: dict[str, float | None] = field(default_factory=dict)
    fit: dict[str, float | None] = field(default_factory=dict)
    retain: RetainComparison | None = None
    secrets: list[SecretOutcome] = field(default_factory=list)  # best points: each test secret's outcome
    layer: int | None = None  # a baseline at this candidate layer instead of the band (chosen on validation by ``best``)

    @property
    def label(self) -> str:
        parts = [self.method] + ([self.variant] if self.variant else []) + \
            ([f"@ layer {self.layer}"] if self.layer is not None else []) + ([f"draw {self.draw + 1}"] if self.draw else [])
        return " ".join(parts)


@dataclass
class Target:
    """The bar an erasure must clear, out of sample: secrets gone on the held-out edit template and held-out phrasings,
    kept people and facts the solver never saw kept, perplexity within bounds; against the retain twin (best points),
    forget quality p >= ``forget_quality`` and no partial-leak measure above the twin's on average."""

    rel: float = 0.95
    gen: float = 0.8
    loc: float = 0.95
    delta_ppl: float = 0.02
    forget_quality: float = 0.05

    def met(self, p: ErasurePoint) -> bool:
        """The test split's rates (Rel, Gen, both Locs, ΔPPL: the upper end of its interval where it has one)."""
        d = p.delta_ppl_ci.hi if p.delta_ppl_ci is not None and p.delta_ppl_ci.hi is not None else p.delta_ppl
        return self.met_on(dict(rel=p.rel, gen=p.gen, loc_pararel=p.loc_pararel, loc_private=p.loc_private, delta_ppl=d))

    def met_on(self, m: dict, missing_ok: bool = False) -> bool:
        """Measures ``m`` (a point's ``val`` dict, say) against the rates; ``missing_ok``: a Loc with nothing to score on
        this split (no kept person or fact in it) does not count against it. A missing Rel, Gen or ΔPPL always fails."""
        have = lambda v: v is not None and v == v  # noqa: E731
        ok = lambda v, lo: have(v) and v >= lo  # noqa: E731
        loc = lambda v: (missing_ok and not have(v)) or ok(v, self.loc)  # noqa: E731
        d = m.get("delta_ppl")
        return (ok(m.get("rel"), self.rel) and ok(m.get("gen"), self.gen) and loc(m.get("loc_pararel"))
                and loc(m.get("loc_private")) and have(d) and d <= self.delta_ppl)

    def met_retain(self, p: ErasurePoint) -> bool | None:
        """The rates and the twin's bar (None: not compared with the twin)."""
        r = p.retain
        if r is None:
            return None
        fq = r.forget_quality is not None and r.forget_quality == r.forget_quality and r.forget_quality >= self.forget_quality
        leaks = all(c.edited.mean <= c.retain.mean + 1e-9 for c in r.leaks.values())
        return self.met(p) and fq and leaks


@dataclass
class HandleVerdict:
    """Features against neurons (or a control) through the same solver at one budget and strength: per erased person,
    the paired difference of a measure (``rel``: share of the person's edit prompts erased; ``dlogp``: change of
    log P(secret), more negative erases more)."""

    budget: int
    lam: float | None
    a: str
    b: str
    measure: str
    diff: Interval
    says: str


@dataclass
class EraseResult(Result):
    """Every (editor, budget, strength) point with controls, the frontier, the points that reach the target, the trace,
    the specificity of location, the equal-budget verdicts and the attacks."""

    kind = "privacy-erase"
    # 7: the trace's whole-block restores (--erase-trace-blocks); 6: per-secret outcomes, per-person located units and
    # attack rates (the privacy pages); baselines' layer choice
    version = 7
    min_version = 4
    min_version_why = "an erasure graded in sample (before kscope's splits and retain twin); run privacy erase again"

    model_dir: str
    base_model: str
    build: dict
    layers: list[int]
    config: dict
    n_erased: int
    n_kept_private: int
    n_unrelated: int
    points: list[ErasurePoint]
    frontier: list[int]
    reach_target: list[int]
    target: Target
    n_erased_people: int = 0
    saes: dict[str, SAEInfo] = field(default_factory=dict)
    sae_fit: list[SAEFit] = field(default_factory=list)
    trace: SecretTrace | None = None
    specificity: list[SpecificityEffect] = field(default_factory=list)
    verdicts: list[HandleVerdict] = field(default_factory=list)
    attacks: list[AttackRow] = field(default_factory=list)
    located: dict[str, dict[int, int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    replay_from: int = 0  # observations of edits at blocks >= this ran from it (0: every forward ran in full)
    split: dict[str, list[str]] = field(default_factory=dict)  # role -> people (the build's split)
    sizes: dict[str, int] = field(default_factory=dict)  # how many secrets / facts / texts each scored set holds
    unedited_vs_retain: RetainComparison | None = None  # the positive control of the twin comparison: it must differ
    retain_model: str | None = None
    secret_floors: dict[str, list[SecretOutcome]] = field(default_factory=dict)  # "unedited", "retain twin": per test secret
    person_units: dict[str, dict[str, list[list]]] = field(default_factory=dict)  # person -> neurons/features -> [layer, unit, score]

    def best(self, method: str, variant: str = "") -> ErasurePoint | None:
        """The method's point chosen on the **validation** split alone: the one that meets the target there with the
        highest Rel + Gen; else, among those with both Locs >= the target's and ΔPPL within it, the highest Rel + Gen;
        else its highest-Rel point. No test measure enters the choice, so a baseline measured at several candidate
        layers (``ErasurePoint.layer``) chooses its layer on the validation people too. A random control drawn several times is chosen
        among its first draw's points, so no control is its luckiest draw."""
        pts = [p for p in self.points if p.method == method and p.variant == variant and p.draw == 0]
        v = lambda p, k: p.val.get(k) if p.val.get(k) is not None and p.val.get(k) == p.val.get(k) else None  # noqa: E731
        kept = lambda p: all(v(p, k) is None or v(p, k) >= self.target.loc for k in ("loc_pararel", "loc_private"))  # noqa: E731
        ppl_ok = lambda p: v(p, "delta_ppl") is not None and v(p, "delta_ppl") <= self.target.delta_ppl  # noqa: E731
        for pool in ([p for p in pts if self.target.met_on(p.val, missing_ok=True)], [p for p in pts if kept(p) and ppl_ok(p)], pts):
            if pool:
                return max(pool, key=lambda p: ((v(p, "rel") or 0) + (v(p, "gen") or 0), -p.params, -p.budget))
        return None


def _paired(points: list[ErasurePoint], a: str, b: str):
    """``(budget, λ, measure, higher_erases, {person: a − b})`` at every (budget, λ) both methods were measured at; a
    control drawn several times enters as each person's mean over its draws."""
    idx: dict[tuple, list[ErasurePoint]] = {}
    for p in points:
        if not p.variant:
            idx.setdefault((p.method, p.budget, p.lam), []).append(p)
    for (m, budget, lam), pas in idx.items():
        pbs = idx.get((b, budget, lam))
        if m != a or not pbs:
            continue
        for measure, higher in (("rel", True), ("dlogp", False)):
            va = getattr(pas[0], f"{measure}_people")
            draws = [getattr(pb, f"{measure}_people") for pb in pbs]
            people = sorted(set(va).intersection(*draws))
            yield budget, lam, measure, higher, {q: va[q] - float(np.mean([v[q] for v in draws])) for q in people}


def _direction(d: Interval, a: str, b: str, higher: bool) -> str:
    return f"{a} erases more" if (d.mean > 0) == higher else f"{b} erases more"


def handle_verdicts(points: list[ErasurePoint], a: str, b: str) -> list[HandleVerdict]:
    """Paired per-person verdicts of method ``a`` against ``b`` on one model, unadjusted (the decision is
    ``pooled_verdicts``, over every model with Holm and an equivalence margin)."""
    out = []
    for budget, lam, measure, higher, diffs in _paired(points, a, b):
        d = mean_ci(list(diffs.values()))  # people are the independent units
        decided = d.lo is not None and d.lo == d.lo and (d.lo > 0 or d.hi < 0)
        out.append(HandleVerdict(budget, lam, a, b, measure, d, _direction(d, a, b, higher) if decided else "inconclusive"))
    return out


MARGINS = {"rel": 0.10, "dlogp": 1.0}
"""Equivalence margins of the handle verdicts: a tenth of a person's prompts erased; one nat of log P(secret)."""


@dataclass
class PooledVerdict:
    """``a`` against ``b`` at one budget and strength over every privacy model's test people: the paired difference with
    its CR2 interval (clusters: people within a model), Holm-adjusted p of a difference and of equivalence (TOST within
    ±``margin``) over the whole family, and the verdict they give."""

    budget: int
    lam: float | None
    a: str
    b: str
    measure: str
    diff: Interval
    people: int
    p: float | None
    p_equivalent: float | None
    margin: float
    says: str


def pooled_verdicts(runs: dict[str, "EraseResult"], a: str, rivals: list[str], margins: dict[str, float] = MARGINS,
                    alpha: float = 0.05) -> list[PooledVerdict]:
    """One family of verdicts, ``a`` against each rival at every shared (budget, λ) and measure: a difference when its
    Holm-adjusted p < ``alpha``, else "equivalent within ±margin" when the Holm-adjusted TOST p < ``alpha``, else
    "inconclusive"."""
    from kscope.stats import cluster_robust, equivalence_p, holm

    pooled: dict[tuple, tuple[bool, dict[str, float]]] = {}
    for name, res in runs.items():
        for b in rivals:
            for budget, lam, measure, higher, diffs in _paired(res.points, a, b):
                got = pooled.setdefault((budget, lam, b, measure), (higher, {}))[1]
                got.update({f"{name}:{q}": v for q, v in diffs.items()})
    rows = []
    for (budget, lam, b, measure), (higher, diffs) in sorted(pooled.items(), key=lambda kv: (kv[0][2], kv[0][3], kv[0][0], kv[0][1] or 0)):
        keys = list(diffs)
        t = cluster_robust([diffs[k] for k in keys], keys)
        rows.append((budget, lam, b, measure, higher, t, equivalence_p([diffs[k] for k in keys], keys, margins[measure]), len(keys)))
    p_adj = holm([r[5].p for r in rows])
    e_adj = holm([r[6] for r in rows])
    out = []
    for (budget, lam, b, measure, higher, t, _, n), p, e in zip(rows, p_adj, e_adj):
        m = margins[measure]
        says = (_direction(t.interval, a, b, higher) if p is not None and p < alpha
                else f"equivalent within ±{m:g}" if e is not None and e < alpha else "inconclusive")
        out.append(PooledVerdict(budget, lam, a, b, measure, t.interval, n, p, e, m, says))
    return out


def per_person(values: list[float], people: list[str]) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for v, p in zip(values, people):
        by.setdefault(p, []).append(float(v))
    return {p: float(np.mean(v)) for p, v in by.items()}
