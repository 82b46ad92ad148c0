"""The erasure section of a report: tables and figures of ``privacy erase`` results."""

from __future__ import annotations

from kscope.app.report_attacks import attack_tables
from kscope.app.tables import Table, ci, fmt
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
        out += attack_tables(name, res, _title(res))
    if res.specificity:
        out.append((f"Privacy erasure, {name}: specificity of location", specificity_table(res), None))
    out += [(f"Privacy erasure, {name}: every point", privacy_curve_table(res), None),
            (f"Privacy erasure, {name}: SAEs of the band", sae_fit_table(res), None)]
    return out
