"""Each method's best point (chosen on the validation split) graded on the test split against the retain twin, and the
attacks on it, beside the unedited model, the retain twin and the base model."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kscope.privacy.edit.plan import lowest_edited
from kscope.privacy.judge.attacks import attack
from kscope.privacy.judge.leaks import char_overlap, forget_quality, no_more_than, rank_gap
from kscope.privacy.judge.observe import Observation, Observer, greedy_texts, person_ci
from kscope.privacy.study.results import LeakCompare, RetainComparison, SecretOutcome

LEAKS = ("token_recovery", "prefix_share", "char_overlap")
FLOORS = NEVER_TAUGHT, TWIN, UNEDITED = ("base model (never taught)", "retain twin", "unedited")
"""The reference states an edit is read against (their attack rows' and secret floors' names): the base model never
taught the secrets, the retain twin, the unedited model."""


@dataclass
class Graded:
    """One model state's per-secret measures on one split: ranks, candidate counts, truth ratios, partial leaks."""

    people: list[str]
    ranks: list[int]
    sizes: list[int]
    truth: list[float]
    leaks: dict[str, list[float]]
    attributes: list[str] = field(default_factory=list)
    rel: list[bool] = field(default_factory=list)  # still produced (greedy, whole) on the held-out edit template
    gen: list[float] = field(default_factory=list)  # share of the held-out phrasings that still produce it


def graded(obs: Observer, lm, now: Observation, lowest_edited: int, scope: str = "test") -> Graded:
    """The model as it is now (with ``now`` its observation) on ``scope``'s erased secrets: candidates on the held-out
    edit prompt, partial leaks on it and the held-out phrasings (greedy decoding for the characters)."""
    pick = [i for i, s in enumerate(obs.scopes["rel"]) if s == scope]
    ranks, sizes, truth = obs.candidate_scores(lowest_edited)
    leaks = obs.partial(now, scope)
    pairs = obs.scored_pairs(scope)
    texts = greedy_texts(lm, [(p, s) for _, p, s in pairs])
    by: dict[int, list[float]] = {}
    for (i, _, secret), text in zip(pairs, texts):
        by.setdefault(i, []).append(char_overlap(secret, text))
    leaks["char_overlap"] = [float(np.mean(by[i])) for i in pick]
    return Graded([obs.people[i] for i in pick], [ranks[i] for i in pick], [sizes[i] for i in pick], [truth[i] for i in pick], leaks,
                  [obs.relations[i] for i in pick], [all(now.ok["rel"][i]) for i in pick],
                  [float(np.mean(now.ok["gen"][i])) if now.ok["gen"][i] else float("nan") for i in pick])


def outcomes(g: Graded) -> list[SecretOutcome]:
    """``g`` per secret, for the privacy pages."""
    return [SecretOutcome(p, a, bool(r), gen, int(rank), int(n), {k: float(v[j]) for k, v in g.leaks.items()})
            for j, (p, a, r, gen, rank, n) in enumerate(zip(g.people, g.attributes, g.rel, g.gen, g.ranks, g.sizes))]


def against_twin(g: Graded, twin: Graded) -> RetainComparison:
    """``g`` against the retain twin's measures of the same secrets."""
    leaks = {}
    share = []
    for k in LEAKS:
        ok = no_more_than(g.leaks[k], twin.leaks[k])
        leaks[k] = LeakCompare(person_ci(g.leaks[k], g.people), person_ci(twin.leaks[k], g.people), float(np.mean(ok)) if ok else float("nan"))
        share.append(ok)
    every = [all(x) for x in zip(*share)]
    return RetainComparison(person_ci(g.ranks, g.people), person_ci(twin.ranks, g.people),
                            person_ci(rank_gap(g.ranks, twin.ranks, g.sizes), g.people), forget_quality(g.truth, twin.truth),
                            leaks, float(np.mean(every)) if every else None, list(g.truth), list(twin.truth), every)


def worth_attacking(val: dict, min_share: float) -> bool:
    """Does a best point erase and keep at least ``min_share`` on the validation split (a Loc with nothing to score there
    does not count against it)?"""
    rel, loc = val.get("rel"), val.get("loc")
    return rel is not None and rel == rel and rel >= min_share and (loc is None or loc != loc or loc >= min_share)


ATTACKED_CONTROLS = ("keyed-random-directions", "keyed-random-columns")


def attacked_methods(cfg) -> set[str]:
    """The methods whose best point may face the attacks: ``--attack-method``, else every method and the keyed random
    controls (random directions and columns through the same solver), so a located handle's resistance is read beside
    a random one's."""
    if not cfg.attacks.attacks:
        return set()
    return set(cfg.attacks.methods or [*cfg.methods, *(c for c in cfg.controls if c in ATTACKED_CONTROLS)])


def grade_and_attack(job, lm, base_lm, twin_lm, obs: Observer, base: Observation, twin_obs: Observer | None, result, editors,
                     observations, attack_facts, relearn_on, lr: float, clean_check, progress) -> None:
    """Each method's best point (chosen on validation people) gets its test ranks and, with a twin, its comparison with
    it; the best points of ``--attack-method`` (default: every method and the keyed random controls, each control's
    best point chosen on validation as a method's is) that erase and keep at least ``--attack-min`` (validation Rel
    and Loc), the unedited model, the retain twin and the base model face every attack on the test people's secrets
    (relearning trains on the validation people's)."""
    cfg = job.erase
    keys = list(dict.fromkeys((p.method, p.variant) for p in result.points if p.kind != "control"))
    attacked = attacked_methods(cfg)
    controls = [(p.method, "") for p in result.points if p.kind == "control" and p.method in attacked]
    best = {k: result.best(*k) for k in keys}
    idx = {id(p): i for i, p in enumerate(result.points)}
    task = progress.add_task("ranks, twin and attacks", total=len(best) + 1 + 3 * bool(attacked) + len(set(controls)))
    twin = None
    if twin_obs is not None:
        twin = graded(twin_obs, twin_lm, twin_obs.baseline(), 0)
        unedited = graded(obs, lm, base, 0)
        result.unedited_vs_retain = against_twin(unedited, twin)
        result.secret_floors = {UNEDITED: outcomes(unedited), TWIN: outcomes(twin)}
    progress.advance(task)
    if attacked:
        result.attacks.append(attack(base_lm, attack_facts, cfg.attacks, lr, NEVER_TAUGHT, "–", relearn_on=relearn_on))
        if twin_lm is not None:
            result.attacks.append(attack(twin_lm, attack_facts, cfg.attacks, lr, TWIN, "–", relearn_on=relearn_on))
        result.attacks.append(attack(lm, attack_facts, cfg.attacks, lr, UNEDITED, "–", relearn_on=relearn_on))
        progress.advance(task, 3)
    for (method, variant), p in best.items():
        if p is None:
            continue
        i = idx[id(p)]
        editor = editors[i]
        with editor.applied(lm.model):
            g = graded(obs, lm, observations[i], lowest_edited(method, cfg.layers, cfg.resid_layers, p.layer))
        if method in attacked and not variant and worth_attacking(p.val, cfg.attacks.min_share):
            result.attacks.append(attack(lm, attack_facts, cfg.attacks, lr, method, p.budget if p.budget else "all", editor,
                                         relearn_on))
        p.rank = person_ci(g.ranks, g.people)
        p.secrets = outcomes(g)
        if twin is not None:
            p.retain = against_twin(g, twin)
        clean_check(method)
        progress.advance(task)
    for method, _ in dict.fromkeys(controls):  # the random controls, attacked like the located handles
        p = result.best(method)
        if p is not None and worth_attacking(p.val, cfg.attacks.min_share):
            label = f"{method} (control)" + (f", λ {p.lam:g}" if p.lam is not None else "")
            result.attacks.append(attack(lm, attack_facts, cfg.attacks, lr, label, p.budget if p.budget else "all",
                                         editors[idx[id(p)]], relearn_on))
            clean_check(method)
        progress.advance(task)
