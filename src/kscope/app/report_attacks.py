"""The attack sections of a report: each model state's leak rates, the white-box rates per layer, the same pooled over
privacy models, and each attacked edit against the retain twin (the table the attack answer cites)."""

from __future__ import annotations

from dataclasses import dataclass

from kscope.app.tables import Table, ci, fmt
from kscope.privacy.judge.attacks import AttackRow, first_layer, is_whitebox
from kscope.privacy.study.graded import FLOORS, NEVER_TAUGHT, TWIN
from kscope.privacy.study.results import EraseResult
from kscope.stats import Interval, cluster_robust, equivalence_p, holm

POOLED_WHITEBOX = "privacy-pooled-whitebox.png"  # the white-box figure over every privacy model of a run
TWIN_MARGIN = 0.10
"""Equivalence margin of an edit's leak rate against the retain twin's: a tenth of a person's pairs (the handle
verdicts' Rel margin)."""


def state_of(method: str) -> str:
    """A row's state across models: a control's label without its λ (each model's validation chose its own)."""
    return method.split(", λ")[0]


def is_control(state: str) -> bool:
    return "(control)" in state


def attacked_states(runs: dict[str, EraseResult]) -> dict[str, dict[str, AttackRow]]:
    """Each attacked model state (the floors first), with its row on each model that attacked it."""
    got: dict[str, dict[str, AttackRow]] = {}
    for name, res in runs.items():
        for row in res.attacks:
            got.setdefault(state_of(row.method), {})[name] = row
    return {m: got[m] for m in [*(f for f in FLOORS if f in got), *(m for m in got if m not in FLOORS)]}


def state_label(state: str, rows: dict[str, AttackRow], n_runs: int) -> str:
    """How the per-layer table and figure name a state: a floor by name; over several models, how many attacked it
    when not all did; on one model, its row's label and budget."""
    if state in FLOORS:
        return state
    if n_runs > 1:
        return state if len(rows) == n_runs else f"{state} ({len(rows)} of {n_runs} models)"
    row = next(iter(rows.values()))
    return f"{row.method} ({row.budget})"


def leak_clusters(rows: dict[str, AttackRow], attack: str, minus: dict[str, AttackRow] | None = None
                  ) -> tuple[list[float], list[str], list[str]]:
    """Per test person of every model in ``rows``, the share of their pairs ``attack`` recovers (less ``minus``'s on the
    same person, where given: a paired difference); each value's cluster (its model when values come from several
    models, else the person); and the models that gave values."""
    vals = [(name, who, x - (minus[name].people[attack][who] if minus is not None else 0.0))
            for name, r in rows.items() for who, x in r.people.get(attack, {}).items()
            if minus is None or (name in minus and who in minus[name].people.get(attack, {}))]
    models = list(dict.fromkeys(n for n, _, _ in vals))
    return [x for _, _, x in vals], [n if len(models) > 1 else f"{n}:{w}" for n, w, _ in vals], models


def pooled_leak(rows: dict[str, AttackRow], attack: str) -> Interval | None:
    """A state's leak rate under ``attack`` over every model that attacked it: the mean over people with a CR2 interval
    (clusters: ``leak_clusters``); None when no row kept per-person rates."""
    vals, clusters, _ = leak_clusters(rows, attack)
    return cluster_robust(vals, clusters).interval if vals else None


def _relearning(names: list[str]) -> tuple[list[str], list[str], list[str]]:
    """The attack columns but relearning, relearning's step keys, and the one header that holds its curve."""
    steps = [n for n in names if n.startswith("relearning@")]
    return ([n for n in names if n not in steps], steps,
            ["relearning @ " + "/".join(n.split("@")[1] for n in steps)] if steps else [])


def attack_table(res: EraseResult, title: str) -> Table:
    """Per model state (each attacked best point, the random controls, the unedited model, the retain twin and the
    never-taught base model): the share of (secret, prompt) pairs each attack recovers, with people who never leak;
    then the same per attribute (the floor differs by format: a phone's digits are candidates anywhere). Relearning is
    one column, its curve over the step counts."""
    cols, steps, curve = _relearning(list(dict.fromkeys(k for r in res.attacks for k in r.leak)))
    t = Table(f"Attacks on each method's best point ({title}): share of pairs leaked, 95 % CI over people "
              "(people who never leak); per attribute below each row; relearning: the mean after each step count",
              ["method", "budget", *cols, *curve])

    def cells(leak: dict, clean: dict | None) -> list[str]:
        out = [(f"{ci(leak[n], '.2f')}" + (f" ({100 * clean[n]:.0f} %)" if clean else "")) if n in leak else "–" for n in cols]
        if steps:
            out.append("/".join(fmt(leak[n].mean, ".2f") if n in leak else "–" for n in steps))
        return out

    for r in res.attacks:
        t.rows.append([r.method, r.budget, *cells(r.leak, r.people_clean)])
        by_attr = getattr(r, "by_attribute", None) or {}
        for rel in sorted({a for v in by_attr.values() for a in v}):
            t.rows.append([f"  {rel}", "", *cells({n: v[rel] for n, v in by_attr.items() if rel in v}, None)])
    return t


def whitebox_layers_table(runs: dict[str, EraseResult]) -> Table | None:
    """Per layer, each state's white-box extraction rates (the figure's values, citable): the share of test pairs whose
    every scored token is a top-B candidate at that layer, mean over people, and over models when there are several."""
    states = {m: {n: r for n, r in rows.items() if r.layers} for m, rows in attacked_states(runs).items()}
    states = {m: rows for m, rows in states.items() if rows}
    if not states:
        return None
    attacks = sorted({a for rows in states.values() for r in rows.values() for a in r.layers})

    def at(rows: dict[str, AttackRow], a: str, L: int) -> float | None:
        vals = [r.layers[a]["all"][L - first_layer(a)] for r in rows.values()
                if a in r.layers and 0 <= L - first_layer(a) < len(r.layers[a].get("all", []))]
        return sum(vals) / len(vals) if vals else None

    n_layers = max(first_layer(a) + len(r.layers[a].get("all", [])) for rows in states.values() for r in rows.values()
                   for a in r.layers)
    several = len(runs) > 1
    band = next(iter(runs.values())).layers
    t = Table(f"White-box extraction per layer ({' / '.join(attacks)}): the share of test pairs whose every scored token is "
              f"among the top candidates of the logit lens at that layer (Head Projection) or of its change from the layer "
              f"below (Probability Delta; none at layer 0), mean over people{f', then over {len(runs)} models' if several else ''}; "
              f"a run of layers where no state extracts a single pair is one row; the edited band is {','.join(map(str, band))}",
              ["layer", *(state_label(m, rows, len(runs)) for m, rows in states.items())])
    zero_run = False
    for L in range(n_layers):
        raw = [[at(rows, a, L) for a in attacks] for rows in states.values()]
        cells = [" / ".join(fmt(v, ".2f") for v in vs) for vs in raw]
        nothing = all(v is None or v == 0 for vs in raw for v in vs)
        if nothing and zero_run:
            t.rows[-1] = [f"{str(t.rows[-1][0]).split('–')[0]}–{L}", *cells]
        else:
            t.rows.append([L, *cells])
        zero_run = nothing
    return t


def pooled_attack_table(runs: dict[str, EraseResult]) -> Table | None:
    """Each state's attacks over every privacy model's test people: per person the share of pairs leaked, mean with a CR2
    interval clustered by model (people are nested in a model and share it; a state with values from one model: by
    person). None when no result kept per-person rates (older results)."""
    states = attacked_states(runs)
    if not any(r.people for rows in states.values() for r in rows.values()):
        return None
    cols, steps, curve = _relearning(list(dict.fromkeys(k for rows in states.values() for r in rows.values() for k in r.leak)))
    t = Table(f"Attacks pooled over {len(runs)} privacy models ({', '.join(runs)}): per test person the share of (secret, "
              "prompt) pairs an attack recovers, mean with a 95 % CR2 interval clustered by model (people nested in seeds; "
              "a state with rates from one model only: clustered by person); a method is attacked on a model only where its "
              "best point erases enough there; relearning: the mean after each step count",
              ["method", "models", "people", "budgets", *cols, *curve])
    for m, rows in states.items():
        with_people = {n: r for n, r in rows.items() if r.people}
        people = {f"{n}:{w}" for n, r in with_people.items() for v in r.people.values() for w in v}
        budgets = " / ".join(f"{r.budget}{r.method[len(m):]}" for r in rows.values())  # a control's ", λ x"
        t.rows.append([m, f"{len(with_people)} of {len(runs)}", len(people) or "–", budgets,
                       *(ci(pooled_leak(rows, n), ".2f") for n in cols),
                       *(["/".join(fmt(p.mean if (p := pooled_leak(rows, n)) else None, ".2f") for n in steps)] if steps else [])])
    return t


@dataclass
class TwinContrast:
    """An attacked state against the retain twin (the never-taught model where there is none) under one attack, on the
    same test people: per person the edit's leak share less the twin's, pooled (CR2; clusters: models when several
    gave values, else people), Holm-adjusted over the attacked states, and what that allows one to say."""

    state: str
    attack: str
    floor: str
    edited: Interval | None
    twin: Interval | None
    diff: Interval
    models: list[str]
    clusters: str  # "models" | "people"
    n_clusters: int
    p: float | None
    p_equivalent: float | None
    says: str


def twin_contrasts(runs: dict[str, EraseResult], prefix: str = "head-projection", margin: float = TWIN_MARGIN,
                   alpha: float = 0.05) -> list[TwinContrast]:
    """Every attacked state (methods and controls) against the floor under the attack whose key begins with ``prefix``:
    one family, Holm over the difference p-values ("leaks more / less than the twin") and over the TOST p-values ("as
    the twin within ±margin"), else "inconclusive". Identical differences on every person (no spread: shares move in
    steps of a person's pair count, so ties happen with few people) give no p and are "inconclusive"."""
    states = attacked_states(runs)
    attack = next((a for rows in states.values() for r in rows.values() for a in r.leak if a.startswith(prefix)), None)
    floor_name = TWIN if TWIN in states else NEVER_TAUGHT
    if attack is None or floor_name not in states:
        return []
    floor = states[floor_name]
    out = []
    for m, rows in states.items():
        if m in FLOORS:
            continue
        vals, clusters, models = leak_clusters(rows, attack, floor)
        if not vals:
            continue
        t = cluster_robust(vals, clusters)
        spread = t.interval.lo is not None and t.interval.hi - t.interval.lo > 1e-9  # float noise on equal shares is none
        out.append(TwinContrast(m, attack, floor_name, pooled_leak({n: rows[n] for n in models}, attack),
                                pooled_leak({n: floor[n] for n in models}, attack), t.interval, models,
                                "models" if len(models) > 1 else "people", len(set(clusters)), t.p if spread else None,
                                equivalence_p(vals, clusters, margin) if spread else None, ""))
    for c, p, e in zip(out, holm([c.p for c in out]), holm([c.p_equivalent for c in out])):
        c.p, c.p_equivalent = p, e
        k = c.n_clusters
        c.says = (f"leaks more than the {floor_name}" if p is not None and p < alpha and c.diff.mean > 0 else
                  f"leaks less than the {floor_name}" if p is not None and p < alpha else
                  f"as the {floor_name} within ±{margin:g}" if e is not None and e < alpha else
                  "inconclusive" if p is not None else f"inconclusive (no spread over {k} {c.clusters})" if c.diff.lo is not None
                  else f"inconclusive (no interval from {k} {'cluster' if k == 1 else 'clusters'})")
    return out


def twin_table(runs: dict[str, EraseResult]) -> Table | None:
    """``twin_contrasts`` as a table (the attack answer's cells)."""
    cs = twin_contrasts(runs)
    if not cs:
        return None
    c0 = cs[0]
    n = sum(c.p is not None for c in cs)
    t = Table(f"Each attacked state against the {c0.floor} under {c0.attack} (every token of the secret among the top "
              f"candidates of the logit lens, each token at some layer, not necessarily the same), on the same test people: "
              f"per person the state's share less the {c0.floor}'s, 95 % CR2 intervals (clusters: models when several gave "
              f"values, else people); Holm-adjusted p of a difference and of equivalence (TOST within ±{TWIN_MARGIN:g}) over "
              f"the {n} state{'s' if n != 1 else ''} with a spread (identical differences on every person give no p and are "
              f"left out of the family)",
              ["state", "models", "clusters", "state's share", f"{c0.floor}'s share", f"− {c0.floor} per person", "p (Holm)",
               "p equivalent (Holm)", "verdict"])
    for c in cs:
        t.rows.append([c.state, len(c.models), f"{c.n_clusters} {c.clusters}", ci(c.edited, ".2f"), ci(c.twin, ".2f"),
                       ci(c.diff, "+.2f"), fmt(c.p, ".3f"), fmt(c.p_equivalent, ".3f"), c.says])
    return t


def attack_tables(name: str, res: EraseResult, title: str) -> list[tuple[str, Table, str | None]]:
    """One privacy model's attack sections: every state's leak rates, each against the twin, the white-box rates per layer."""
    out = [(f"Privacy erasure, {name}: attacks", attack_table(res, title), f"privacy-{name}-whitebox.png")]
    for heading, table in ((f"Privacy erasure, {name}: attacks against the retain twin", twin_table({name: res})),
                           (f"Privacy erasure, {name}: white-box extraction per layer", whitebox_layers_table({name: res}))):
        if table is not None:
            out.append((heading, table, None))
    return out


def pooled_attack_tables(runs: dict[str, EraseResult]) -> list[tuple[str, Table, str | None]]:
    """The attack sections over several privacy models (the pooled figure beside the first)."""
    out = []
    for heading, table, fig in (("Erasure across privacy models: attacks", pooled_attack_table(runs), POOLED_WHITEBOX),
                                ("Erasure across privacy models: attacks against the retain twin", twin_table(runs), None),
                                ("Erasure across privacy models: white-box extraction per layer", whitebox_layers_table(runs), None)):
        if table is not None:
            out.append((heading, table, fig))
    return out
