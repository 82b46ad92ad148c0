"""Every ranking the erase study's editors need, from the erased secrets' key prompts only, and the measured effect of
each specificity step of location."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from kscope.model.sites import Site, down_proj_weight
from kscope.privacy.edit.guardrail import activation_scale
from kscope.privacy.edit.plan import Located, equal_params, random_ranking
from kscope.privacy.locate import scores as locate
from kscope.privacy.locate.fit import secret_acts
from kscope.privacy.locate.select import depn_select, kn_select
from kscope.units.provision import neuron_units

PAGE_UNITS = 10  # each person's top units kept in the result


def located(job, lm, erase_set, stranger_set, feats, rfeats, infos, train_texts, progress, seconds, choice=(), fchoice=()):
    """Every ranking the editors need, the measured effect of each specificity step (``stranger_set``: the erased
    facts' templates about strangers, for the 'format' step) and each person's own top neurons and features.
    ``choice`` / ``fchoice``: the other layers the neuron / SAE baselines may choose; their units are scored in the same
    pass (after the band's) and ranked per layer (``depn@L``, ``kn-erase@L``, ``features@L``)."""
    cfg = job.erase
    t = time.time()
    neurons = [neuron_units(lm, L) for L in cfg.layers]
    fsets = [feats[L] for L in cfg.layers]
    rl = [L for L in cfg.resid_layers if L in rfeats]
    rsets = [rfeats[L] for L in rl]
    cneurons = [neuron_units(lm, L) for L in choice]
    cfsets = [feats[L] for L in fchoice]
    sets = [*neurons, *fsets, *rsets, *cneurons, *cfsets]
    specs = [(L, None, None) for L in cfg.layers] + [(L, infos[Site(L, "mlp.out").name].path, "mlp.out") for L in cfg.layers] + \
        [(L, infos[Site(L, "resid.post").name].path, "resid.post") for L in rl] + [(L, None, None) for L in choice] + \
        [(L, infos[Site(L, "mlp.out").name].path, "mlp.out") for L in fchoice]
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
    j = 2 * nL + len(rsets)
    for L, u in zip(choice, cneurons):  # each candidate layer alone, ranked as the band is
        n = min(max(cfg.neuron_budgets), u.n_units)
        rankings[f"depn@{L}"] = locate.to_units(depn_select(scores[j], cfg.depn_threshold, n), [u.n_units], [L])
        rankings[f"kn-erase@{L}"] = locate.to_units(kn_select(scores[j], owner, n), [u.n_units], [L])
        j += 1
    for L, u in zip(fchoice, cfsets):
        rankings[f"features@{L}"] = ranked(scores, j, j + 1, [u.n_units], [L], max_fb)
        j += 1
    person_t = torch.as_tensor(person)
    by_person = {}  # each person's own top units (mean score over their key prompts), for the privacy pages
    for pi, who in enumerate(people):
        by_person[who] = {}
        for kind, a, b, widths in (("neurons", 0, nL, widths_n), ("features", nL, 2 * nL, widths_f)):
            top = locate.flat(scores[a:b])[person_t == pi].mean(0).topk(min(PAGE_UNITS, sum(widths)))
            by_person[who][kind] = [[L, u, round(float(v), 6)] for (L, u), v in
                                    zip(locate.to_units(top.indices.tolist(), widths, cfg.layers), top.values.tolist())]
    k = max(1, max_fb // len(people))  # each person's share at the largest budget
    specificity = []
    for kind, a, b in (("neuron", 0, nL), ("feature", nL, 2 * nL)):
        before = locate.flat(raw[a:b])
        for name, sc in steps:
            after = locate.flat(sc[a:b])
            specificity.append(locate.SpecificityEffect(kind, name, locate.removed_share(before, after, person, k)))
            before = after
    scales = {"mlp.out": {}, "resid.post": {}}
    acts = secret_acts(lm, erase_set, [u.site for u in (*fsets, *rsets, *cfsets)])
    retain_acts = retain_sequences(lm, [u.site for u in (*fsets, *rsets, *cfsets)], train_texts[: cfg.generic_texts])
    retain: dict[str, dict[int, list]] = {"mlp.out": {}, "resid.post": {}}
    for u in (*fsets, *rsets, *cfsets):
        scales[u.site.kind][u.site.layer] = activation_scale(u, acts[u.site], range(u.n_units))
        retain[u.site.kind][u.site.layer] = retain_acts[u.site]
    widths = {L: (d_model, d_mlp) for L in cfg.layers}
    widths.update({L: (d_model, d_mlp) for L in (*choice, *fchoice)})
    return Located(list(cfg.layers), rankings, feats, rfeats, scales, None, widths, retain, cfg.gate_percentile,
                   cfg.clamp, cfg.gate), specificity, by_person


@torch.no_grad()
def retain_sequences(lm, sites, texts, max_tokens: int = 64) -> dict:
    """Per site, each text's activations ``[seq, d]`` (its first ``max_tokens`` tokens): the retain sequences whose
    share of active tokens sets the gated clamp's sequence threshold."""
    from kscope.model.hooks import site_activations

    out = {s: [] for s in sites}
    for text in texts:
        ids = lm.tokenizer(text).input_ids[:max_tokens]
        if len(ids) < 2:
            continue
        acts = site_activations(lm.model, sites, torch.tensor([ids], device=lm.device))
        for s in sites:
            out[s].append(acts[s][0].float().cpu())
    return out
