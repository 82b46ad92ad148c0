"""What a ``reproduce`` run will do, said before it starts: each stage reused or run, whether the SAE corpus and each
SAE are cached, and the minutes each part should take, from rates measured on a 2-core CPU with default options."""

from __future__ import annotations

from kscope.model.sites import Site, n_layers
from kscope.privacy.edit.plan import plan
from kscope.privacy.study.erase import candidate_layers

# Seconds of each part on the 2-core CPU of the README's run (default options; see docs/results.md), and what they scale
# with: the SAE corpus per 1024 sequences, an SAE per site (its share of the activation pass and its training), the
# fact stages per built-in-sized fact set (33 facts), the privacy build per model. Its erasure: loading and set-up, the
# trace (x 2.3 with --erase-trace-blocks), location per band layer, each point of the grid (a fixed part and a part per
# block its observation replays, from the lowest edited layer up), the attacks (relearning per step beyond 5, for the
# ~5 states attacked). Fitted to the default run (637 s) and the deep-erasure study (1,645 s); the sweep per layer x
# site cell.
RATES = {"corpus": 343.0, "sae": 162.0, "compare": 46.0, "faithfulness": 124.0, "interpret": 13.0, "monosemanticity": 21.0,
         "explorer": 8.0, "privacy-build": 274.0, "privacy-erase": 52.0, "privacy-trace": 50.0, "privacy-location": 36.0,
         "privacy-point": 1.72, "privacy-point-block": 0.462, "privacy-attacks": 290.0, "privacy-relearn-step": 7.0,
         "sweep": 40.0}
TRACE_BLOCKS = 2.3
BUILTIN_FACTS = 33


def sae_sites(cfg, stages: set[str]) -> list[Site]:
    """The SAE sites the chosen stages need (all on the base model)."""
    sites: list[Site] = []
    if stages & {"compare", "faithfulness", "interpret", "monosemanticity", "explorer"}:
        sites.append(Site(cfg.layer, "mlp.out"))
    if "privacy-erase" in stages:
        sites += [Site(L, "mlp.out") for L in cfg.erase.layers]
        if "gated-clamp-resid" in cfg.erase.methods:
            sites += [Site(L, "resid.post") for L in cfg.erase.resid_layers]
    if "sweep" in stages:
        sites += [Site(L, s) for L in cfg.sweep_layers for s in ("mlp.out", "resid.post")]
    return list(dict.fromkeys(sites))


def cache_status(cfg, sites: list[Site], lm) -> tuple[bool, list[Site]]:
    """Whether the generated corpus is cached, and which SAEs are not."""
    from kscope.units.corpus import CorpusConfig, build_corpus, cached_text_path
    from kscope.units.provision import cached_sae_dir, sae_key

    ccfg: CorpusConfig = cfg.corpus
    corpus_cached = not ccfg.generate or cached_text_path(lm, ccfg.generate, ccfg.gen_len, ccfg.seed, cfg.model.cache_dir).exists()
    if not corpus_cached:
        return False, sites
    corpus = build_corpus(lm, ccfg, None, cfg.model.cache_dir)
    missing = [s for s in sites if not (cached_sae_dir(lm, s, cfg.sae_train, sae_key(lm.fingerprint, s, cfg.sae_train, corpus,
                                                                                      ccfg.seq_len), cfg.model.cache_dir)
                                        / "kscope.json").exists()]
    return True, missing


def estimate(cfg, unit: str, depth: int | None = None) -> float:
    """Seconds a stage should take with ``cfg``'s options, from ``RATES``; ``depth``: the model's layers (unknown: the
    erase estimate takes the top edited layer's block as the last)."""
    stage = unit.split(":")[0]
    facts = min(cfg.max_facts, BUILTIN_FACTS) if cfg.facts is None else cfg.max_facts
    scale = facts / BUILTIN_FACTS
    if stage == "sweep":
        protocols = len(cfg.sweep_selection) * len(cfg.sweep_ablation)
        return RATES["sweep"] * len(cfg.sweep_layers) * 2 * scale * (1 + 0.6 * (protocols - 1))
    if stage == "privacy-build":
        twin = (1 - cfg.privacy.forget) if cfg.privacy.retain_twin else 0.0  # the twin trains on the kept people alone
        return RATES[stage] * cfg.privacy.n_people / 12 * (1 + twin) * (3 if ":full-" in unit else 1)  # all epochs against early stopping
    if stage == "privacy-erase":
        e = cfg.erase
        choice, fchoice = candidate_layers(e, depth or 10**6)  # depth unknown: assume the layer above the band exists
        points = plan(e.methods, e.controls, e.neuron_budgets, e.feature_budgets, e.revs_budgets, e.keyed.lams, e.taus,
                      e.raw_location, e.random_draws, choice, fchoice)
        edited = [*e.layers, *choice, *fchoice]
        replayed = (depth or max(edited) + 1) - min(edited)  # an observation replays the blocks from the lowest edited one
        per_point = RATES["privacy-point"] + RATES["privacy-point-block"] * replayed
        relearn = max(0, max(e.attacks.relearn_steps, default=0) - 5) if "relearning" in e.attacks.attacks else 0
        attacks = RATES["privacy-attacks"] + RATES["privacy-relearn-step"] * relearn if e.attacks.attacks else 0.0
        return (RATES[stage] + RATES["privacy-trace"] * (TRACE_BLOCKS if e.trace_blocks else 1.0)
                + RATES["privacy-location"] * len(e.layers) + per_point * len(points) + attacks)
    return RATES[stage] * scale


def plan_lines(cfg, units: list[str], reused: dict[str, bool], lm, sites: list[Site]) -> list[str]:
    """The plan ``reproduce`` prints before any work (``sites``: the SAEs the stages to run need)."""
    corpus_cached, missing = cache_status(cfg, sites, lm) if sites else (True, [])
    lines, total = [], 0.0
    if sites:
        t_corpus = 0.0 if corpus_cached else RATES["corpus"] * cfg.corpus.generate / 1024
        t_saes = RATES["sae"] * len(missing)
        total += t_corpus + t_saes
        lines.append(f"SAE corpus: {'cached' if corpus_cached else f'to sample, ~{t_corpus / 60:.0f} min'}; SAEs: "
                     f"{len(sites) - len(missing)} of {len(sites)} cached" + (f", {len(missing)} to train, ~{t_saes / 60:.0f} min"
                                                                           if missing else ""))
    for u in units:
        if reused[u]:
            lines.append(f"{u}: done with these options, reused")
            continue
        t = estimate(cfg, u, n_layers(lm.model) if lm is not None else None)
        total += t
        lines.append(f"{u}: runs, ~{t / 60:.1f} min")
    lines.append(f"estimated total ~{total / 60:.0f} min (rates measured on a 2-core CPU; a faster machine takes less)")
    return lines
