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
class ErasurePoint:
    """One editor at one budget and strength (controls too). Rates are shares of (fact, prompt) pairs; ``dlogp`` is the
    change of log P(secret) and ``rank``/``exposure_all`` the secret's rank among candidates of its format and
    ``log2 |candidates| - log2 rank``, each a mean over people with its interval (ranks only where measured).
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
    exposure: float | None
    dlogp: Interval
    rank: Interval | None = None
    exposure_all: Interval | None = None
    params: int = 0
    lam: float | None = None
    tau: float | None = None
    variant: str = ""  # e.g. "raw location" (no specificity steps)
    rel_people: dict[str, float] = field(default_factory=dict)
    dlogp_people: dict[str, float] = field(default_factory=dict)
    by_layer: dict[int, int] = field(default_factory=dict)
    units: list[list[int]] = field(default_factory=list)

    @property
    def label(self) -> str:
        parts = [self.method] + ([self.variant] if self.variant else [])
        return " ".join(parts)


@dataclass
class Target:
    """The bar an erasure must clear: secrets gone on edit and held-out prompts, everything else kept."""

    rel: float = 0.95
    gen: float = 0.8
    loc: float = 0.95
    delta_ppl: float = 0.02

    def met(self, p: ErasurePoint) -> bool:
        ok = lambda v, lo: v is not None and v == v and v >= lo  # noqa: E731
        return (ok(p.rel, self.rel) and ok(p.gen, self.gen) and ok(p.loc_pararel, self.loc) and ok(p.loc_private, self.loc)
                and p.delta_ppl <= self.delta_ppl)


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
    version = 3

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

    def best(self, method: str, variant: str = "") -> ErasurePoint | None:
        """The method's point that meets the target with the highest Rel + Gen; else, among those with both Locs >= the
        target's and ΔPPL within it, the highest Rel + Gen; else its highest-Rel point."""
        pts = [p for p in self.points if p.method == method and p.variant == variant]
        for pool in ([p for p in pts if self.target.met(p)],
                     [p for p in pts if (p.loc or 0) >= self.target.loc and p.delta_ppl <= self.target.delta_ppl], pts):
            if pool:
                return max(pool, key=lambda p: ((p.rel or 0) + (p.gen or 0), -p.params, -p.budget))
        return None


def handle_verdicts(points: list[ErasurePoint], a: str, b: str) -> list[HandleVerdict]:
    """Paired per-person verdicts of method ``a`` against ``b`` at every (budget, λ) both were measured at."""
    out = []
    idx = {(p.method, p.budget, p.lam): p for p in points if not p.variant}
    for (m, budget, lam), pa in idx.items():
        pb = idx.get((b, budget, lam))
        if m != a or pb is None:
            continue
        for measure, higher in (("rel", True), ("dlogp", False)):
            va, vb = getattr(pa, f"{measure}_people"), getattr(pb, f"{measure}_people")
            people = sorted(set(va) & set(vb))
            d = mean_ci([va[q] - vb[q] for q in people])  # people are the independent units
            says = "no difference"
            if d.lo is not None and d.lo == d.lo and (d.lo > 0 or d.hi < 0):
                better_a = (d.lo > 0) == higher
                says = f"{a} erases more" if better_a else f"{b} erases more"
            out.append(HandleVerdict(budget, lam, a, b, measure, d, says))
    return out


def per_person(values: list[float], people: list[str]) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for v, p in zip(values, people):
        by.setdefault(p, []).append(float(v))
    return {p: float(np.mean(v)) for p, v in by.items()}
