"""The erasure section of a report: tables and figures of ``privacy erase`` results."""

from __future__ import annotations

from kscope.app.tables import Table, ci, fmt
from kscope.privacy.judge.attacks import AttackRow
from kscope.privacy.study.graded import FLOORS
from kscope.privacy.study.results import EraseResult, pooled_verdicts


def _budget(p) -> str:
    if p.kind == "control" and not p.method.startswith(("random", "keyed-random")):
        return "all"
    return str(p.budget) if p.budget else "–"


def _strength(p) -> str:
    return f"λ {p.lam:g}" if p.lam is not None else (f"τ {p.tau:g}" if p.tau is not None else "–")


def _point_row(res: EraseResult, p) -> list:
    return [p.label, _budget(p), _strength(p), p.n_units, f"{p.params:,}" if p.params else "–", fmt(p.expressible, ".2f"),
            f"{p.n_weights:,}",
            fmt(p.rel, ".2f"), fmt(p.gen, ".2f"), fmt(p.loc_pararel, ".2f"), fmt(p.loc_private, ".2f"),
            ci(p.delta_ppl_ci, "+.3f") if p.delta_ppl_ci else fmt(p.delta_ppl, "+.3f"), ci(p.dlogp, "+.1f"),
            fmt(p.fit.get("rel"), ".2f"), fmt(p.fit.get("loc_private"), ".2f"),
            "yes" if res.target.met(p) else ""]


_HEADERS = ["method", "budget", "strength", "units", "parameters", "expressible", "weights changed", "Rel ↑", "Gen ↑", "Loc facts ↑",
            "Loc people ↑", "ΔPPL ↓", "Δ log P(secret)", "Rel in sample", "Loc people in sample", "target"]
_SCOPE = ("Test split, out of sample: Rel on each secret's held-out edit template, Gen on held-out phrasings, Loc on kept "
          "people and known facts the solver never preserved, ΔPPL on held-out text; in sample: on the key prompts and the "
          "preserved people (what the edit was fitted to, never graded)")


def build_note(res: EraseResult) -> str:
    b = res.build
    how = "early-stopped" if b.get("early_stop") else "fixed epochs"
    band = f" {b.get('band')}" if b.get("train") == "band" else ""
    return f"{how}, {b.get('epochs_run')} epochs, {b.get('train')}{band} weights, seed {b.get('seed')}"


def _title(res: EraseResult) -> str:
    scored = f", scored on the {len(res.split['forget-test'])} test people" if res.split.get("forget-test") else ""
    return (f"{res.n_erased} secrets of {res.n_erased_people} people erased{scored}, band {','.join(map(str, res.layers))} "
            f"({build_note(res)})")


def privacy_table(res: EraseResult) -> Table:
    """Each method's best point, chosen on the validation split (meets the target there with the highest Rel + Gen, else
    keeps both Locs and ΔPPL within it), reported on the test split."""
    t = Table(f"{_title(res)}: each method at its best point, chosen on the validation people and reported on the test "
              f"people (target: Rel ≥ {res.target.rel}, Gen ≥ {res.target.gen}, both Loc ≥ {res.target.loc}, ΔPPL ≤ "
              f"{res.target.delta_ppl:+.0%} at the upper end of its interval over test texts). {_SCOPE}", _HEADERS)
    for m, v in dict.fromkeys((p.method, p.variant) for p in res.points):
        b = res.best(m, v)
        if b is not None:
            t.rows.append(_point_row(res, b))
    return t


def privacy_curve_table(res: EraseResult) -> Table:
    t = Table(f"Every point ({_title(res)}). {_SCOPE}", _HEADERS)
    for p in res.points:
        t.rows.append(_point_row(res, p))
    return t


def retain_table(res: EraseResult) -> Table:
    """Each method's best point against the retain twin on the test secrets: two-sided rank, forget quality, partial leaks."""
    tg = res.target
    t = Table("Against the retain twin (the same fine-tune without the forget set), test secrets on their held-out edit "
              "template and phrasings: the secret's rank among candidates of its format (edited / twin), the two-sided gap "
              "|rank − twin| / candidates, forget quality (TOFU: KS p-value of the per-secret truth ratios), partial leaks "
              "(edited / twin, means over people), the share of secrets leaking no more than the twin on every measure, and "
              f"the whole target (rates, forget quality ≥ {tg.forget_quality}, no mean leak above the twin's)",
              ["method", "budget", "strength", "rank", "twin rank", "rank gap ↓", "forget quality ↑", "token recovery",
               "prefix", "characters", "≤ twin ↑", "target with twin"])

    def row(name, budget, strength, r, met):
        lk = lambda k: f"{fmt(r.leaks[k].edited.mean, '.2f')} / {fmt(r.leaks[k].retain.mean, '.2f')}" if k in r.leaks else "–"  # noqa: E731
        return [name, budget, strength, ci(r.rank, ".0f"), ci(r.retain_rank, ".0f"), ci(r.rank_gap, ".2f"),
                fmt(r.forget_quality, ".3f"), lk("token_recovery"), lk("prefix_share"), lk("char_overlap"),
                fmt(r.erased_share, ".2f"), met]

    if res.unedited_vs_retain is not None:
        t.rows.append(row("unedited (must differ)", "–", "–", res.unedited_vs_retain, ""))
    for m, v in dict.fromkeys((p.method, p.variant) for p in res.points):
        b = res.best(m, v)
        if b is not None and b.retain is not None:
            t.rows.append(row(b.label, _budget(b), _strength(b), b.retain, "yes" if tg.met_retain(b) else ""))
    return t


def split_table(res: EraseResult) -> Table:
    """Who and what fits the edit, chooses its settings, and scores it."""
    t = Table("The splits: what fits each edit (in sample), where settings are chosen (validation) and where they are "
              "reported (test)", ["set", "size", "people"])
    for k, n in res.sizes.items():
        role = {"erased val": "forget-val", "erased test": "forget-test", "kept preserved": "keep-preserved",
                "kept val": "keep-val", "kept test": "keep-test"}.get(k)
        t.rows.append([k, n, ", ".join(res.split.get(role, [])) if role else ""])
    return t


def trace_table(res: EraseResult) -> Table:
    """Where the secrets live: per layer, Δ log P(secret) when the MLP output is zeroed or computed by the base model's MLP."""
    tr = res.trace
    t = Table(f"Where the secrets live ({tr.n_facts} secrets, {tr.n_people} people; clean log P {ci(tr.logp, '+.2f')}): "
              "Δ log P(secret) per layer, mean over people",
              ["layer", "zero @ subject", "base MLP @ subject", "zero @ answer", "base MLP @ answer"])
    for L in sorted({c.layer for c in tr.cells}):
        t.rows.append([L] + [fmt(tr.effect(L, pos, what), "+.2f") for pos in ("subject", "answer") for what in ("zero", "restore")])
    for g in tr.groups:
        t.rows.append([f"{g.label} restored", "", "", "", ci(g.dlogp, "+.2f")])
    if tr.band_restore is not None:
        t.rows.append([f"band {','.join(map(str, tr.band))} MLPs restored", "", "", "", ci(tr.band_restore, "+.2f")])
    return t


def computed_table(res: EraseResult) -> Table:
    """Where the secrets are computed: whole blocks restored to the base model's, alone and cumulatively."""
    tr = res.trace
    t = Table(f"Where the secrets are computed: Δ log P(secret) with whole blocks (attention, MLP, norms) restored to the base "
              f"model's at every position, mean over people; the bottom-up restore removes the secret fastest over layers "
              f"{','.join(map(str, tr.computed))} (the band now edited: {','.join(map(str, tr.band))})",
              ["layer", "block L", "blocks 0..L", "blocks L..last"])
    for L in sorted({c.layer for c in tr.blocks}):
        t.rows.append([L] + [fmt(tr.block_effect(L, s), "+.2f") for s in ("block", "below", "above")])
    return t


def specificity_table(res: EraseResult) -> Table:
    t = Table("Specificity of location: share of each person's top units (largest budget's share) each step removes, and Rel "
              "of the keyed handles with and without the steps", ["units", "step", "removed", "Rel with", "Rel raw"])
    raw = {p.method: p for p in res.points if p.variant == "raw location"}
    for s in res.specificity:
        method = "keyed-features" if s.kind == "feature" else "keyed-neurons"
        r = raw.get(method)
        with_ = next((p for p in res.points if r and p.method == method and not p.variant and p.budget == r.budget and p.lam == r.lam), None)
        t.rows.append([f"{s.kind}s", s.step, f"{100 * s.removed:.0f} %", fmt(with_.rel, ".2f") if with_ else "–",
                       fmt(r.rel, ".2f") if r else "–"])
    return t


def verdict_table(res: EraseResult) -> Table:
    t = Table("Features against neurons through the same keyed solver, per budget s (features: s directions; neurons at equal "
              "rank: s columns; at equal parameters: s·d_mlp/d_model columns): paired over erased people, 95 % t intervals, "
              "unadjusted (one model; the verdict over every model, Holm-adjusted, is the pooled table)",
              ["budget", "strength", "against", "measure", "features − other", "verdict"])
    for v in res.verdicts:
        says = "inconclusive" if v.says == "no difference" else v.says  # results before the pooled verdicts
        t.rows.append([v.budget, f"λ {v.lam:g}" if v.lam is not None else "–", v.b, v.measure, ci(v.diff, "+.2f"), says])
    return t


HANDLE_RIVALS = ["keyed-neurons-params", "keyed-neurons", "keyed-random-directions", "keyed-random-columns"]


def pooled_verdict_table(runs: dict[str, EraseResult]) -> Table:
    """Located features against each rival handle through the same solver, pooled over every model's test people."""
    vs = pooled_verdicts(runs, "keyed-features", HANDLE_RIVALS)
    t = Table(f"Located features against each handle through the same keyed solver, pooled over {len(runs)} privacy models' "
              f"test people: features − other per person (rel: share of the person's held-out prompts erased, higher erases "
              f"more; dlogp: Δ log P(secret), lower erases more), 95 % CR2 intervals clustered by person within a model; one "
              f"family of {len(vs)} verdicts, Holm-adjusted p of a difference and of equivalence (TOST within the margin)",
              ["budget", "strength", "against", "measure", "people", "features − other", "p (Holm)", "p equivalent (Holm)",
               "margin", "verdict"])
    for v in vs:
        t.rows.append([v.budget, f"λ {v.lam:g}" if v.lam is not None else "–", v.b, v.measure, v.people, ci(v.diff, "+.2f"),
                       fmt(v.p, ".3f"), fmt(v.p_equivalent, ".3f"), f"±{v.margin:g}", v.says])
    return t


def attack_table(res: EraseResult) -> Table:
    """Per model state (each attacked best point, the random controls, the unedited model, the retain twin and the
    never-taught base model): the share of (secret, prompt) pairs each attack recovers, with people who never leak;
    then the same per attribute (the floor differs by format: a phone's digits are candidates anywhere). Relearning is
    one column, its curve over the step counts."""
    names = list(dict.fromkeys(k for r in res.attacks for k in r.leak))
    steps = [n for n in names if n.startswith("relearning@")]
    cols = [n for n in names if n not in steps] + (["relearning @ " + "/".join(n.split("@")[1] for n in steps)] if steps else [])
    t = Table(f"Attacks on each method's best point ({_title(res)}): share of pairs leaked, 95 % CI over people "
              "(people who never leak); per attribute below each row; relearning: the mean after each step count",
              ["method", "budget", *cols])

    def cells(leak: dict, clean: dict | None) -> list[str]:
        out = [(f"{ci(leak[n], '.2f')}" + (f" ({100 * clean[n]:.0f} %)" if clean else "")) if n in leak else "–"
               for n in names if n not in steps]
        if steps:
            out.append("/".join(fmt(leak[n].mean, ".2f") if n in leak else "–" for n in steps))
        return out

    for r in res.attacks:
        t.rows.append([r.method, r.budget, *cells(r.leak, r.people_clean)])
        by_attr = getattr(r, "by_attribute", None) or {}
        for rel in sorted({a for v in by_attr.values() for a in v}):
            t.rows.append([f"  {rel}", "", *cells({n: v[rel] for n, v in by_attr.items() if rel in v}, None)])
    return t


POOLED_WHITEBOX = "privacy-pooled-whitebox.png"  # the white-box figure over every privacy model of a run


def attacked_states(runs: dict[str, EraseResult]) -> dict[str, dict[str, AttackRow]]:
    """Each attacked model state (the floors first), with its row on each model that attacked it."""
    got: dict[str, dict[str, AttackRow]] = {}
    for name, res in runs.items():
        for row in res.attacks:
            got.setdefault(row.method, {})[name] = row
    return {m: got[m] for m in [*(f for f in FLOORS if f in got), *(m for m in got if m not in FLOORS)]}


def leak_clusters(rows: dict[str, AttackRow], attack: str, minus: dict[str, AttackRow] | None = None
                  ) -> tuple[list[float], list[str]]:
    """Per test person of every model in ``rows``, the share of their pairs ``attack`` recovers (less ``minus``'s on the
    same person, where given: a paired difference), and each value's cluster: its model when there are several, else
    the person."""
    vals = [(name, who, x - (minus[name].people[attack][who] if minus is not None else 0.0))
            for name, r in rows.items() for who, x in r.people.get(attack, {}).items()
            if minus is None or (name in minus and who in minus[name].people.get(attack, {}))]
    by_model = len({n for n, _, _ in vals}) > 1
    return [x for _, _, x in vals], [n if by_model else f"{n}:{w}" for n, w, _ in vals]


def pooled_leak(rows: dict[str, AttackRow], attack: str):
    """A state's leak rate under ``attack`` over every model that attacked it: the mean over people with a CR2 interval
    (clusters: ``leak_clusters``); None when no row kept per-person rates."""
    from kscope.stats import cluster_robust

    vals, clusters = leak_clusters(rows, attack)
    return cluster_robust(vals, clusters).interval if vals else None


def whitebox_layers_table(runs: dict[str, EraseResult]) -> Table | None:
    """Per layer, each state's white-box extraction rates (the figure's values, citable): the share of test pairs whose
    every scored token is a top-B candidate at that layer, mean over people, and over models when there are several."""
    states = {m: rows for m, rows in attacked_states(runs).items() if any(r.layers for r in rows.values())}
    if not states:
        return None
    attacks = sorted({a for rows in states.values() for r in rows.values() for a in r.layers})
    first = {a: 1 if a.startswith("probability-delta") else 0 for a in attacks}  # a change from the layer below: none at 0

    def at(rows: dict[str, AttackRow], a: str, L: int) -> str:
        vals = [r.layers[a]["all"][L - first[a]] for r in rows.values()
                if a in r.layers and 0 <= L - first[a] < len(r.layers[a].get("all", []))]
        return fmt(sum(vals) / len(vals), ".2f") if vals else "–"

    n_layers = max(first[a] + len(r.layers[a].get("all", [])) for rows in states.values() for r in rows.values() for a in r.layers)
    several = len(runs) > 1
    head = lambda m, rows: (f"{m} ({len(rows)} of {len(runs)} models)" if several and len(rows) < len(runs) else m) \
        if several else f"{m} ({next(iter(rows.values())).budget})" if m not in FLOORS else m  # noqa: E731
    band = next(iter(runs.values())).layers
    t = Table(f"White-box extraction per layer ({' / '.join(attacks)}): the share of test pairs whose every scored token is "
              f"among the top candidates of the logit lens at that layer (Head Projection) or of its change from the layer "
              f"below (Probability Delta; none at layer 0), mean over people{f', then over {len(runs)} models' if several else ''}; the edited "
              f"band is {','.join(map(str, band))}", ["layer", *(head(m, rows) for m, rows in states.items())])
    rows = [[L, *(" / ".join(at(rows, a, L) for a in attacks) for rows in states.values())] for L in range(n_layers)]
    nothing = lambda r: all(set(c.replace("0.00", "").replace("–", "").replace(" / ", "")) == set() for c in r[1:])  # noqa: E731
    for r in rows:  # a run of layers where nothing is extracted by any state is one row
        if t.rows and nothing(r) and nothing(t.rows[-1]):
            t.rows[-1] = [f"{str(t.rows[-1][0]).split('–')[0]}–{r[0]}", *r[1:]]
        else:
            t.rows.append(r)
    return t


def pooled_attack_table(runs: dict[str, EraseResult]) -> Table:
    """Each state's attacks over every privacy model's test people: per person the share of pairs leaked, mean with a CR2
    interval clustered by model (people are nested in a model and share it; a state attacked on one model: by person)."""
    states = attacked_states(runs)
    names = list(dict.fromkeys(k for rows in states.values() for r in rows.values() for k in r.leak))
    steps = [n for n in names if n.startswith("relearning@")]
    cols = [n for n in names if n not in steps]
    t = Table(f"Attacks pooled over {len(runs)} privacy models ({', '.join(runs)}): per test person the share of (secret, "
              "prompt) pairs an attack recovers, mean with a 95 % CR2 interval clustered by model (people nested in seeds; "
              "a state attacked on one model only: clustered by person); a method is attacked on a model only where its best "
              "point erases enough there; relearning: the mean after each step count",
              ["method", "models", "people", "budgets", *cols, *(["relearning @ " + "/".join(n.split("@")[1] for n in steps)]
                                                                    if steps else [])])
    for m, rows in states.items():
        def pooled(attack: str):
            return pooled_leak(rows, attack)

        people = {f"{n}:{w}" for n, r in rows.items() for v in r.people.values() for w in v}
        t.rows.append([m, f"{len(rows)} of {len(runs)}", len(people) or "–", " / ".join(str(r.budget) for r in rows.values()),
                       *(ci(pooled(n), ".2f") for n in cols),
                       *(["/".join(fmt(p.mean if (p := pooled(n)) else None, ".2f") for n in steps)] if steps else [])])
    return t


def sae_fit_table(res: EraseResult) -> Table:
    t = Table("SAEs of the band on the privacy model (explained variance)",
              ["site", "held-out text", "secret positions", "held-out text, SAE's own model", "training tokens", "dead"])
    for f in res.sae_fit:
        info = res.saes.get(f"{f.layer}/{f.site}")
        stats = (info.stats if info else None) or {}
        t.rows.append([f"{f.layer}/{f.site}", fmt(f.ev_generic, ".3f"), fmt(f.ev_private, ".3f"), fmt(f.ev_generic_source, ".3f"),
                       stats.get("n_train_tokens", "–"), fmt(stats.get("dead_fraction"), ".2f")])
    return t


def study_table(runs: dict[str, EraseResult]) -> Table:
    """Each method's best point (chosen on each model's validation people), pooled over the privacy models' test people:
    Rel and Gen per person with cluster-robust intervals (CR2, clusters = people within a model), the Locs and ΔPPL as
    their per-model values, forget quality from one KS test over every model's test secrets, and how many models met
    the whole target (rates and the twin's bar)."""
    from kscope.privacy.judge.leaks import forget_quality
    from kscope.stats import cluster_robust

    names = list(runs)
    t = Table(f"Pooled over {len(names)} privacy models ({', '.join(names)}): each method at the best point its validation "
              "people chose, on the test people; Rel and Gen per person, 95 % CR2 intervals clustered by person within a "
              "model; Locs and ΔPPL per model; forget quality: one KS test over every model's test secrets",
              ["method", "people", "Rel ↑", "Gen ↑", "Loc facts ↑", "Loc people ↑", "ΔPPL ↓", "forget quality ↑", "≤ twin ↑",
               "target met"])
    for m, v in dict.fromkeys((p.method, p.variant) for r in runs.values() for p in r.points):
        best = {n: runs[n].best(m, v) for n in names}
        got = {n: b for n, b in best.items() if b is not None}
        if not got:
            continue

        def pooled(attr: str):
            vals = [(f"{n}:{who}", x) for n, b in got.items() for who, x in getattr(b, attr).items()]
            return cluster_robust([x for _, x in vals], [k for k, _ in vals]).interval, len(vals)

        rel, n_people = pooled("rel_people")
        gen, _ = pooled("gen_people")
        per = lambda f: " / ".join(f(b) for b in got.values())  # noqa: E731
        twins = [b.retain for b in got.values() if b.retain is not None]
        fq = forget_quality([x for r in twins for x in r.truth], [x for r in twins for x in r.retain_truth]) if twins else None
        erased = [e for r in twins for e in r.erased]
        met = [runs[n].target.met_retain(b) for n, b in got.items()]
        t.rows.append([f"{m} {v}".strip(), n_people, ci(rel, ".2f"), ci(gen, ".2f"), per(lambda b: fmt(b.loc_pararel, ".2f")),
                       per(lambda b: fmt(b.loc_private, ".2f")), per(lambda b: fmt(b.delta_ppl, "+.3f")), fmt(fq, ".3f"),
                       fmt(sum(erased) / len(erased) if erased else None, ".2f"),
                       f"{sum(bool(x) for x in met)} of {len(met)}" if twins else "–"])
    return t


def targets_table(runs: dict[str, EraseResult]) -> Table:
    """Per method, on each privacy model: does any point reach the target, and the best point."""
    names = list(runs)
    t = Table("Best point per method and privacy model (Rel / Gen / Loc / ΔPPL @ budget, strength; ✓ = meets the target)",
              ["method", *(f"{n} ({runs[n].build.get('epochs_run')} epochs)" for n in names)])
    for m, v in dict.fromkeys((p.method, p.variant) for r in runs.values() for p in r.points):
        row = [f"{m} {v}".strip()]
        for n in names:
            b = runs[n].best(m, v)
            row.append("–" if b is None else f"{'✓ ' if runs[n].target.met(b) else ''}{fmt(b.rel, '.2f')} / {fmt(b.gen, '.2f')} / "
                                             f"{fmt(b.loc, '.2f')} / {fmt(b.delta_ppl, '+.3f')} @ {_budget(b)}, {_strength(b)}")
        t.rows.append(row)
    return t


def tables(name: str, res: EraseResult) -> list[tuple[str, Table, str | None]]:
    out = [(f"Privacy erasure, {name}: where the secrets live", trace_table(res), f"privacy-{name}-trace.png"),
           *([(f"Privacy erasure, {name}: where the secrets are computed", computed_table(res), None)]
             if res.trace and res.trace.blocks else []),
           (f"Privacy erasure, {name}: each method at its best point", privacy_table(res), f"privacy-{name}.png"),
           (f"Privacy erasure, {name}: against the retain twin", retain_table(res), None),
           (f"Privacy erasure, {name}: the splits", split_table(res), None),
           (f"Privacy erasure, {name}: features against neurons at equal budgets", verdict_table(res), f"privacy-{name}-budget.png")]
    if res.attacks:
        out.append((f"Privacy erasure, {name}: attacks", attack_table(res), f"privacy-{name}-whitebox.png"))
        layers = whitebox_layers_table({name: res})
        if layers is not None:
            out.append((f"Privacy erasure, {name}: white-box extraction per layer", layers, None))
    if res.specificity:
        out.append((f"Privacy erasure, {name}: specificity of location", specificity_table(res), None))
    out += [(f"Privacy erasure, {name}: every point", privacy_curve_table(res), None),
            (f"Privacy erasure, {name}: SAEs of the band", sae_fit_table(res), None)]
    return out
