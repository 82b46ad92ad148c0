"""Every ranking the erase study's editors need, from the erased secrets' key prompts only, and the measured effect of
each specificity step of location."""

from __future__ import annotations

import time
from pathlib import Path

from kscope.model.sites import Site, down_proj_weight
from kscope.privacy.edit.guardrail import activation_scale
from kscope.privacy.edit.plan import Located, equal_params, random_ranking
from kscope.privacy.locate import scores as locate
from kscope.privacy.locate.fit import secret_acts
from kscope.privacy.locate.select import depn_select, kn_select
from kscope.units.provision import neuron_units


def located(job, lm, erase_set, stranger_set, feats, rfeats, infos, train_texts, progress, seconds):
    """Every ranking the editors need, and the measured effect of each specificity step (``stranger_set``: the erased
    facts' templates about strangers, for the 'format' step)."""
    cfg = job.erase
    t = time.time()
    neurons = [neuron_units(lm, L) for L in cfg.layers]
    fsets = [feats[L] for L in cfg.layers]
    rl = [L for L in cfg.resid_layers if L in rfeats]
    rsets = [rfeats[L] for L in rl]
    sets = [*neurons, *fsets, *rsets]
    specs = [(L, None, None) for L in cfg.layers] + [(L, infos[Site(L, "mlp.out").name].path, "mlp.out") for L in cfg.layers] + \
        [(L, infos[Site(L, "resid.post").name].path, "resid.post") for L in rl]
    fp = locate.fingerprint_of(job, specs)

    def scores_of(facts, out: Path, label: str):
        return locate.score_matrices(lm, facts, sets, specs, job.parallel, out, fp, cfg.steps, cfg.locate_method, job.device,
                                     job.cache_dir, progress, label)

    raw = scores_of(erase_set, Path(job.out), "secrets")
    scores, steps = list(raw), []
    if "format" in cfg.specificity:
        fresh = scores_of(stranger_set, Path(str(job.out) + "strangers"), "strangers")
        scores = [s - f.clamp_min(0) for s, f in zip(scores, fresh)]
        steps.append(("format", list(scores)))
    if "generic" in cfg.specificity:
        g = locate.generic_importance(lm, sets, train_texts[: cfg.generic_texts])
        scores = [s / (gi + gi.mean()).clamp_min(1e-12) for s, gi in zip(scores, g)]
        steps.append(("generic", list(scores)))
    seconds["location"] = time.time() - t
    people = list(dict.fromkeys(f.subject for f in erase_set))
    person = [people.index(f.subject) for f in erase_set for _ in f.prompts]
    owner = [i for i, f in enumerate(erase_set) for _ in f.prompts]
    nL = len(cfg.layers)
    d_model, d_mlp = down_proj_weight(lm.model, cfg.layers[0]).shape
    max_fb = max(cfg.feature_budgets)
    need = {"neuron": max(equal_params(max_fb, d_model, d_mlp), max_fb), "feature": max_fb}
    widths_n, widths_f = [u.n_units for u in neurons], [u.n_units for u in fsets]

    def ranked(sc, a: int, b: int, widths, layers, n: int):
        return locate.to_units(locate.per_person(locate.flat(sc[a:b]), person, n), widths, layers)

    N = locate.flat(scores[:nL])
    max_nb = min(max(cfg.neuron_budgets), N.shape[1])
    rankings = {
        "neurons": ranked(scores, 0, nL, widths_n, cfg.layers, need["neuron"]),
        "features": ranked(scores, nL, 2 * nL, widths_f, cfg.layers, need["feature"]),
        "neurons-raw": ranked(raw, 0, nL, widths_n, cfg.layers, need["neuron"]),
        "features-raw": ranked(raw, nL, 2 * nL, widths_f, cfg.layers, need["feature"]),
        "depn": locate.to_units(depn_select(N, cfg.depn_threshold, max_nb), widths_n, cfg.layers),
        "kn-erase": locate.to_units(kn_select(N, owner, max_nb), widths_n, cfg.layers),
    }
    for d in range(cfg.random_draws):  # each draw of the random controls its own units
        tag = f":draw{d}" if d else ""
        rankings["random-neurons" + tag] = random_ranking(dict(zip(cfg.layers, widths_n)), max_nb, f"{cfg.seed}:neurons" + tag)
        rankings["random-features" + tag] = random_ranking(dict(zip(cfg.layers, widths_f)), max_fb, f"{cfg.seed}:features" + tag)
    if rsets:
        rankings["features-resid"] = ranked(scores, 2 * nL, 2 * nL + len(rsets), [u.n_units for u in rsets], rl, max_fb)
    k = max(1, max_fb // len(people))  # each person's share at the largest budget
    specificity = []
    for kind, a, b in (("neuron", 0, nL), ("feature", nL, 2 * nL)):
        before = locate.flat(raw[a:b])
        for name, sc in steps:
            after = locate.flat(sc[a:b])
            specificity.append(locate.SpecificityEffect(kind, name, locate.removed_share(before, after, person, k)))
            before = after
    scales = {"mlp.out": {}, "resid.post": {}}
    acts = secret_acts(lm, erase_set, [u.site for u in (*fsets, *rsets)])
    for u in (*fsets, *rsets):
        scales[u.site.kind][u.site.layer] = activation_scale(u, acts[u.site], range(u.n_units))
    widths = {L: (d_model, d_mlp) for L in cfg.layers}
    return Located(list(cfg.layers), rankings, feats, rfeats, scales, None, widths), specificity
