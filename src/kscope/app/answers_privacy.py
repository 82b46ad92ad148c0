"""The privacy answers of the verdict block: can the secrets be erased, which handle erases them, does the erasure
survive attack. Each sentence cites the table its numbers come from (``report_privacy``)."""

from __future__ import annotations

from kscope.app.answer import Answer, short_ci
from kscope.stats import Interval, cluster_robust, mean_ci

MEASURES = {"rel": "the share of a person's held-out prompts erased (rel, higher erases more)",
            "dlogp": "Δ log P(secret) (dlogp, lower erases more)"}


def _pooled_rel(runs: dict, method: str) -> tuple[Interval | None, int, int]:
    """Rel of a method's best points per test person, pooled over models (CR2 by person), and in how many models the
    best point meets the target."""
    vals, met = [], 0
    for name, res in runs.items():
        b = res.best(method)
        if b is None:
            continue
        vals += [(f"{name}:{who}", x) for who, x in b.rel_people.items()]
        met += bool(res.target.met(b))
    if not vals:
        return None, 0, met
    iv = cluster_robust([x for _, x in vals], [k for k, _ in vals]).interval if len(runs) > 1 else mean_ci([x for _, x in vals])
    return iv, len(vals), met


def _erase(results) -> list[Answer]:
    from kscope.app.report_privacy import HANDLE_RIVALS, pooled_verdicts

    runs = results.privacy
    first = next(iter(runs.values()))
    name = next(iter(runs))
    methods = list(dict.fromkeys(p.method for r in runs.values() for p in r.points if not p.variant))
    reach = {m: _pooled_rel(runs, m) for m in methods}
    t = first.target
    hit = [m for m, (_, _, met) in reach.items() if met]
    where = f"{name}'s test people" if len(runs) == 1 else f"the test people of {len(runs)} privacy models"
    rel = lambda m: f"{m} Rel {short_ci(reach[m][0], '.2f')}" if reach.get(m) and reach[m][0] else f"{m} –"  # noqa: E731
    count = (lambda m: "") if len(runs) == 1 else (lambda m: f" ({reach[m][2]} of {len(runs)} models)")
    handles = [m for m in ("keyed-features", "keyed-neurons", "keyed-unrestricted") if m in reach]
    sentence = (f"On {where}, at the point each method's validation people chose, "
                + (f"{len(hit)} of {len(methods)} methods reach the target (Rel ≥ {t.rel}, Gen ≥ {t.gen}, Loc ≥ {t.loc}, "
                   f"ΔPPL ≤ {t.delta_ppl:+.0%}): {', '.join(m + count(m) for m in hit)}" if hit else
                   f"none of {len(methods)} methods reaches the target (Rel ≥ {t.rel}, Gen ≥ {t.gen}, Loc ≥ {t.loc}, "
                   f"ΔPPL ≤ {t.delta_ppl:+.0%})")
                + (f"; {', '.join(rel(m) for m in handles)} (95 % interval over people)" if handles else "") + ".")
    out = [Answer("erase", "Can the secrets be erased?", sentence, f"{len(hit)} of {len(methods)} reach the target",
                  reach["keyed-features"][0] if "keyed-features" in reach else None, f"privacy-{name}.png",
                  "each method at its best point" if len(runs) == 1 else "Erasure pooled over privacy models")]
    b = first.best("keyed-features")
    if len(runs) > 1:
        vs = [v for v in pooled_verdicts(runs, "keyed-features", HANDLE_RIVALS)]
        how, table = "pooled over models, Holm-adjusted with a TOST margin", "which handle erases more"
    else:
        vs = first.verdicts
        how, table = "one model, unadjusted", "features against neurons at equal budgets"
    if not vs:
        return out
    said = lambda v: "inconclusive" if v.says == "no difference" else v.says  # noqa: E731
    at_best = next((v for v in vs if v.b == "keyed-neurons" and v.measure == "rel" and b is not None and v.budget == b.budget
                    and v.lam == b.lam), None)
    head = at_best or next((v for v in vs if v.b == "keyed-neurons" and v.measure == "rel"), vs[0])
    tally = {}
    for v in vs:
        s = said(v)
        key = "features erase more" if s.startswith("keyed-features") else "the other erases more" if "erases more" in s else \
            "equivalent" if s.startswith("equivalent") else "inconclusive"
        tally[key] = tally.get(key, 0) + 1
    lam = f", λ {head.lam:g}" if head.lam is not None else ""
    out.append(Answer("handle", "Which handle erases them: located features or located neurons?",
                      f"Through the same keyed solver at budget {head.budget}{lam}"
                      + (f" ({name}'s best point)" if len(runs) > 1 and head is at_best else "") + f", located features − {head.b} on "
                      f"{MEASURES.get(head.measure, head.measure)}: {short_ci(head.diff)} ({how}): {said(head)}; over "
                      f"all {len(vs)} budget × strength × measure comparisons: "
                      + ", ".join(f"{n} {k}" for k, n in sorted(tally.items())) + ".",
                      said(head), head.diff, f"privacy-{name}-budget.png", table))
    return out


def _attacks(results) -> Answer | None:
    """Does the erasure survive attack: each attacked state against the retain twin under Head Projection on the same
    test people (``report_attacks.twin_contrasts``, the table this cites), and the highest rate of the other attacks."""
    from kscope.app.report_attacks import POOLED_WHITEBOX, attacked_states, is_control, pooled_leak, twin_contrasts
    from kscope.privacy.judge.attacks import is_whitebox
    from kscope.privacy.study.graded import UNEDITED

    runs = results.privacy
    cs = twin_contrasts(runs)
    if not cs:
        return None
    several = len(runs) > 1
    states = attacked_states(runs)
    c0 = cs[0]
    n = sum(c.p is not None for c in cs)  # the Holm family: states whose differences have a spread
    edited = {c.state: states[c.state] for c in cs}
    others = [a for a in dict.fromkeys(k for rows in edited.values() for r in rows.values() for k in r.leak) if not is_whitebox(a)]
    leaks = [(iv, a, m) for m, rows in edited.items() for a in others if (iv := pooled_leak(rows, a)) is not None]
    top = max(leaks, key=lambda x: x[0].mean, default=None)
    methods = [c for c in cs if not is_control(c.state)] or cs
    best = min(methods, key=lambda c: c.edited.mean if c.edited is not None else 1.0)
    where = lambda c: f" ({len(c.models)} of {len(runs)} models)" if several else ""  # noqa: E731
    unedited = pooled_leak(states[UNEDITED], c0.attack) if UNEDITED in states else None
    sentence = ("Where a best point erased enough to be attacked, Head Projection (every token of the secret among the top "
                "candidates of the logit lens, each at some layer) finds "
                + "; ".join(f"{c.state}{where(c)} {short_ci(c.edited, '.2f')}, − {c.floor} per person {short_ci(c.diff)}: "
                            f"{c.says}" for c in cs)
                + f" ({c0.floor} {short_ci(pooled_leak(states[c0.floor], c0.attack), '.2f')}"
                + (f", unedited model {short_ci(unedited, '.2f')}" if unedited is not None else "")
                + f"; 95 % CR2 intervals, Holm over the {n} attacked state{'s' if n != 1 else ''} with a spread)"
                + (f". The highest rate of the other attacks: {short_ci(top[0], '.2f')} ({top[1]} after {top[2]})" if top else "")
                + ".")
    return Answer("attack", "Does the erasure survive attack?", sentence, best.says, best.diff,
                  POOLED_WHITEBOX if several else f"privacy-{next(iter(runs))}-whitebox.png",
                  "Erasure across privacy models: attacks against the retain twin" if several else "attacks against the retain twin")


def privacy_answers(results) -> list[Answer]:
    """The privacy questions the run can answer, in the report's order."""
    out = _erase(results)
    a = _attacks(results)
    return out + ([a] if a else [])
