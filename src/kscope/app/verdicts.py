"""The study's answers, one sentence per question, from a run's results: the verdict block at the top of ``index.html``
and of ``kscope report --markdown`` (the README quotes it), produced here alone so the page and the README cannot drift.

A sentence is never stronger than its table: "features beat neurons" only when the verdict's p (Holm-adjusted where
the table adjusts) is below 0.05, and for an edit only when suppress and enhance both say so (intersection-union);
"disagree" when the two ops are significant and opposite; "equivalent within ±m" when the verdict's TOST (Holm-adjusted
where its table adjusts) says so or, for a verdict without one (older results), when the whole 95 % interval of the
difference lies inside ±m; otherwise "inconclusive". Each answer names the table its numbers come from.
"""

from __future__ import annotations

import html

from kscope.analyses.cells import LABELS, strength
from kscope.analyses.verdicts import MARGINS, OPS, Verdict, adjust, ops_verdict, paired_verdict, unpaired_verdict
from kscope.app.answer import Answer, short_ci
from kscope.app.answers_privacy import privacy_answers
COMPARE = "Neurons, features and same-site baselines"


def tally(says: dict, a: str = "features", b: str = "neurons") -> tuple[list, list, list, list, list]:
    """The keys of ``says`` (key -> verdict) whose verdict says "<a> better", "<b> better", "disagree ...",
    "equivalent ...", and anything else (inconclusive; an older result's "no difference" too), in the order given."""
    out: tuple[list, list, list, list, list] = ([], [], [], [], [])
    for key, s in says.items():
        i = (0 if s == f"{a} better" else 1 if s == f"{b} better" else 2 if s.startswith("disagree")
             else 3 if s.startswith("equivalent") else 4)
        out[i].append(key)
    return out


def call(v: Verdict | None, margin: float) -> str:
    """The verdict a sentence may state: what the verdict says ("<a> better", "disagree (...)", "equivalent within
    ±m", "inconclusive"); an older verdict's "no difference" becomes "equivalent within ±margin" when the whole 95 %
    interval lies inside it, else "inconclusive" (never "no difference"), as does one with no TOST of its own."""
    if v is None or v.diff.mean is None:
        return "inconclusive"
    if v.says not in ("no difference", "inconclusive") or v.p_equivalent is not None:
        return v.says
    d = v.diff
    if d.lo is not None and d.hi is not None and -margin < d.lo and d.hi < margin:
        return f"equivalent within ±{margin:g}"
    return "inconclusive"


def _phrase(says: str, a: str = "features", b: str = "neurons") -> str:
    if says == f"{a} better":
        return f"{a} beat {b}"
    if says == f"{b} better":
        return f"{b} beat {a}"
    if says.startswith("equivalent"):
        return f"{a} and {b} are {says}"
    if says.startswith("disagree"):
        return f"the two operations {says[:-1].replace('disagree (', 'disagree: ')}, so neither is shown to beat the other"
    return "inconclusive: neither is shown to beat the other"


def _diffs(v: Verdict) -> str:
    """Each op's difference with its interval and p (a two-op verdict), or the one difference (older results)."""
    p = lambda x: f", p {x.p:.2g}" if x.p is not None else ""  # noqa: E731
    if not v.ops:
        return f"suppressed and enhanced combined, {short_ci(v.diff)} (95 % cluster bootstrap over relations{p(v)})"
    return (f"suppressed {short_ci(v.ops['suppress'].diff)}{p(v.ops['suppress'])}, enhanced {short_ci(v.ops['enhance'].diff)}"
            f"{p(v.ops['enhance'])} (in strength, positive favours features; 95 % CR2 intervals over relations; called "
            f"only when both agree, equivalence within ±{v.margin:g} nats by TOST on both)")


def _op_diffs(v: Verdict) -> str:
    """A two-op verdict's differences in short: ``(suppressed d [lo, hi], enhanced d [lo, hi])``."""
    if not v.ops:
        return f"({short_ci(v.diff)})"
    return f"(suppressed {short_ci(v.ops['suppress'].diff)}, enhanced {short_ci(v.ops['enhance'].diff)})"


def _k(res) -> int:
    return max(int(x) for x in (res.config.get("delta_prob", {}).get("ks") or [10]))


def _locate_verdict(res, L: int, other: str = "neuron") -> Verdict | None:
    """Features against ``other`` (the layer's MLP neurons, or a same-site baseline), paired over facts at the largest k,
    suppress and enhance judged apart, CR2 over relations, as the sweep's cells do; None without two facts' per-fact
    effects."""
    k = _k(res)
    rows = [f for f in res.facts if all(x in f.layers.get(L, {}) and f.layers[L][x].effects for x in (other, "feature"))]
    if len(rows) < 2:
        return None
    a, b = ({op: [strength(f.layers[L][kind].effects.top, op, k) for f in rows] for op in OPS} for kind in ("feature", other))
    return ops_verdict(a, b, [f.relation for f in rows], ("features", LABELS.get(other, other)), margin=MARGINS["log"])


def _baseline_verdicts(res, L: int) -> dict[str, Verdict]:
    """Features against each same-site baseline of layer ``L`` (secondary to the paper's comparison with neurons, which
    stays unadjusted): one Holm family over the baselines."""
    got = {kind: _locate_verdict(res, L, kind) for kind in res.summary.get(L, {}) if kind not in ("neuron", "feature")}
    got = {kind: v for kind, v in got.items() if v is not None}
    adjust(got.values())
    return got


def _mono_verdict(results) -> Verdict | None:
    """Per fact, the mean excess AUROC − null of its top units of each kind (each unit against its own activity-matched
    random units), paired over facts, CR2 over relations; None without two facts whose units of both kinds have a null."""
    res = results.monosemanticity
    rel = {f.uid: f.relation for f in results.compare.facts} if results.compare else {}
    per: dict[str, dict[str, list[float]]] = {}
    for kind in ("feature", "neuron"):
        for r in res.results[kind].rows if kind in res.results else []:
            if r.null is not None:
                per.setdefault(r.fact, {}).setdefault(kind, []).append(r.auroc - r.null)
            rel.setdefault(r.fact, r.relation or r.fact)
    facts = [f for f, d in per.items() if len(d) == 2]
    if len(facts) < 2:
        return None
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return paired_verdict([mean(per[f]["feature"]) for f in facts], [mean(per[f]["neuron"]) for f in facts],
                          [rel.get(f, f) for f in facts], margin=MARGINS["auroc"])


def paired_verdicts(results) -> dict[str, Verdict]:
    """The verdicts that need per-fact detail (which ``results.json`` leaves out), computed while it is at hand:
    ``locate/<layer>`` and ``monosemantic``."""
    out = {}
    if results.compare:
        for L in results.compare.summary:
            v = _locate_verdict(results.compare, L)
            if v is not None:
                out[f"locate/{L}"] = v
            out.update({f"locate/{L}/{kind}": b for kind, b in _baseline_verdicts(results.compare, L).items()})
    if results.monosemanticity:
        v = _mono_verdict(results)
        if v is not None:
            out["monosemantic"] = v
    return out


def _paired(results, key: str, compute) -> Verdict | None:
    got = getattr(results, "paired", None) or {}
    return got[key] if key in got else compute()


def _locate(results) -> list[Answer]:
    res = results.compare
    out = []
    k = _k(res)
    for L, by_kind in res.summary.items():
        if not {"neuron", "feature"} <= set(by_kind):
            continue
        sup = {kind: (u.effects.top["suppress"][k].log if u.effects and k in u.effects.top.get("suppress", {}) else None)
               for kind, u in by_kind.items()}
        base = ", ".join(f"{LABELS.get(x, x)} {short_ci(sup[x])}" for x in by_kind if x not in ("neuron", "feature") and sup[x])
        lead = (f"At layer {L} ({res.n_facts} facts; {res.split or 'split not recorded'}), suppressing the top {k} features "
                f"changes log P(answer) by {short_ci(sup['feature'])} and the top {k} neurons by {short_ci(sup['neuron'])}"
                + (f" (same-site {base})" if base else ""))
        q = f"Do features beat neurons at locating a fact (layer {L})?"
        v = _paired(results, f"locate/{L}", lambda: _locate_verdict(res, L))
        if v is None:
            out.append(Answer("locate", q, f"{lead}; not compared: the run kept no per-fact effects to pair.", "inconclusive",
                              None, "compare.png", COMPARE))
            continue
        says = call(v, MARGINS["log"])
        got = getattr(results, "paired", None) or {}
        base = ({kind: got[key] for key in got if key.startswith(f"locate/{L}/") for kind in [key.rsplit("/", 1)[1]]}
                if f"locate/{L}" in got else _baseline_verdicts(res, L))
        against = "; ".join(f"− {LABELS.get(kind, kind)} {_op_diffs(b)}: {_phrase(call(b, MARGINS['log']), 'features', LABELS.get(kind, kind))}"
                            for kind, b in base.items())
        tail = f". Against the same site's units (Holm over them), features {against}" if against else ""
        out.append(Answer("locate", q, f"{lead}; features − neurons, {_diffs(v)}: {_phrase(says)}{tail}.", says, v.diff,
                          "compare.png", COMPARE))
    return out


def _sweep(results) -> list[Answer]:
    """Counts of the sweep's Holm-adjusted cell verdicts, features against MLP neurons, per site (suppress and enhance
    judged apart)."""
    res = results.sweep
    sel, abl = res.config["selection"][0], res.config["ablation"][0]
    k = max(res.config["delta_prob"]["ks"])
    parts, tot, won = [], 0, 0
    for site in res.sites:
        cells = sorted((c for c in res.cells if (c.site, c.selection, c.ablation) == (site, sel, abl)
                        and "feature vs neuron" in c.verdicts), key=lambda c: c.layer)
        says = {c.layer: call(c.verdicts["feature vs neuron"][k], MARGINS["log"]) for c in cells}
        f, n, d, e, rest = tally(says)
        tot, won = tot + len(says), won + len(f)
        lst = lambda xs: f" ({', '.join(map(str, xs))})" if xs else ""  # noqa: E731
        parts.append(f"at {site} features beat neurons at {len(f)} of {len(says)} layers{lst(f)}, neurons beat features at "
                     f"{len(n)}{lst(n)}, suppress and enhance disagree at {len(d)}{lst(d)}, equivalent within "
                     f"±{MARGINS['log']:g} at {len(e)}{lst(e)}, inconclusive at {len(rest)}")
    return [Answer("sweep", "Do features beat neurons across layers and sites (the sweep)?",
                   f"Over {res.n_facts} facts from {res.n_relations} relations (top {k}; a cell is called only when suppress "
                   f"and enhance agree, Holm-adjusted per table, CR2 over relations; selection {sel}, ablation {abl}): "
                   f"{'; '.join(parts)}.",
                   f"features beat neurons in {won} of {tot} cells", None, "sweep/sweep.png", "Verdicts by layer band")]


def _detection(f, n) -> tuple[str, str | None]:
    """The detection AUROC's clause and verdict (Welch over units, TOST within ±MARGINS["auroc"]); ("", None) when the
    run has no detection scores (older results)."""
    a, b = ([r.detection for r in s.rows if r.detection is not None] for s in (f, n))
    if not a or not b:
        return "", None
    v = unpaired_verdict(a, b, margin=MARGINS["auroc"])
    says = call(v, MARGINS["auroc"])
    return (f"; detection AUROC (top against random held-out windows, robust to sparsity): features "
            f"{short_ci(f.detection, '.2f')}, neurons {short_ci(n.detection, '.2f')}, features − neurons {short_ci(v.diff)} (Welch): "
            f"{_phrase(says)}"), says


def _interpret(results) -> Answer | None:
    res = results.interpret
    if not {"neuron", "feature"} <= set(res.results):
        return None
    f, n = res.results["feature"], res.results["neuron"]
    v = unpaired_verdict([r.score for r in f.rows], [r.score for r in n.rows], margin=MARGINS["is"])
    says = call(v, MARGINS["is"])
    det, det_says = _detection(f, n)
    both = says if det_says is None or det_says == says else f"Pearson r: {says}; detection: {det_says}"
    return Answer("interpret", "Are features more interpretable than neurons?",
                  f"Interpretability score at layer {res.layer} ({f.explainer}, Pearson r on held-out text, which favours "
                  f"sparse units): features {short_ci(f.summary)}, neurons {short_ci(n.summary)}; features − neurons {short_ci(v.diff)} "
                  f"(Welch): {_phrase(says)}{det}.", both, v.diff, "interpret.png", "Interpretability score")


def _monosemantic(results) -> Answer | None:
    res = results.monosemanticity
    if not {"neuron", "feature"} <= set(res.results):
        return None
    v = _paired(results, "monosemantic", lambda: _mono_verdict(results))
    s = {k: res.results[k].summary for k in ("feature", "neuron")}
    lead = (f"Monosemanticity AUROC at layer {res.layer} (related against unrelated prompts{f' ({res.unrelated})' if res.unrelated else ''}, "
            f"each unit oriented on {res.orientation or 'its related prompts'}): features {_auroc_null(s['feature'])}, neurons "
            f"{_auroc_null(s['neuron'])}")
    q = "Are features more monosemantic than neurons?"
    if v is None:
        return Answer("monosemantic", q, f"{lead}; not compared: the run kept no per-fact AUROCs with a null to pair.",
                      "inconclusive", None, "monosemanticity.png", "Monosemanticity")
    says = call(v, MARGINS["auroc"])
    return Answer("monosemantic", q, f"{lead}; features − neurons in AUROC − null per fact {short_ci(v.diff)} ({v.diff.n} facts, "
                                     f"CR2 over relations): {_phrase(says)}.", says, v.diff, "monosemanticity.png",
                  "Monosemanticity")


def _auroc_null(s) -> str:
    """A set's AUROC (95 % CR2 interval) beside its null (matched random units: mean, 2.5-97.5 % of the draws)."""
    if s is None:
        return "–"
    if s.null is None:
        return f"{short_ci(s.auroc, '.2f')} (no null)"
    return f"{short_ci(s.auroc, '.2f')} against its null {s.null.mean:.2f} (95 % of draws {s.null.lo:.2f}–{s.null.hi:.2f})"


def answers(results) -> list[Answer]:
    """Every question the run can answer, in the order the report asks them."""
    out: list[Answer] = []
    if results.compare:
        out += _locate(results)
    if results.sweep:
        out += _sweep(results)
    for fn, present in ((_interpret, results.interpret), (_monosemantic, results.monosemanticity)):
        a = fn(results) if present else None
        out += [a] if a else []
    if results.privacy:
        out += privacy_answers(results)
    return out


def markdown_block(items: list[Answer]) -> list[str]:
    """The verdict block as Markdown lines (a heading and one bullet per question)."""
    if not items:
        return []
    return ["", "**Answers**", ""] + [f"- **{a.question}** {a.sentence}" for a in items]


def html_block(items: list[Answer]) -> str:
    """The verdict block of ``index.html``: one line per question, its verdict highlighted."""
    if not items:
        return ""
    rows = "".join(f'<div class="answer" data-key="{a.key}"><div class="q">{html.escape(a.question)}</div>'
                   f'<div class="a"><span class="says">{html.escape(a.says)}</span> {html.escape(a.sentence)}</div></div>'
                   for a in items)
    return f'<section id="verdicts"><h2>Answers</h2>{rows}</section>'
